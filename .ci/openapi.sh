#!/usr/bin/env bash
# Checks the running hub against its OpenAPI document (docs/openapi.yaml,
# served at /openapi.yaml) with Schemathesis: no 5xx, and every answer
# (status code, content type, body) as the document says. Once with the
# memory broker, once with the Redis broker when $REDIS_URL is set (under a
# key prefix of its own, deleted afterwards).
#
#   bash .ci/openapi.sh                 # what .ci/run calls
#   MAX_EXAMPLES=200 bash .ci/openapi.sh
#
# Schemathesis lives in a virtual environment under target/ (never the
# system Python).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
REDIS_PY_VERSION=8.2.0
WEBSOCKETS_VERSION=17.4
MAX_EXAMPLES=${MAX_EXAMPLES:-50}
VENV=target/venv-schemathesis
API_KEY=openapi-check-key

log() { printf '\n== %s\n' "$*"; }

if [ ! -x "$VENV/bin/schemathesis" ] || ! "$VENV/bin/schemathesis" --version | grep -q "$SCHEMATHESIS_VERSION" \
  || ! "$VENV/bin/python" -c 'import redis, websockets' 2>/dev/null; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >/dev/null
  fi
  python3 -m venv --clear "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION" "redis==$REDIS_PY_VERSION" "websockets==$WEBSOCKETS_VERSION"
fi

cargo build -q --bin switchboard
BIN=target/debug/switchboard

WORK=$(mktemp -d)
HUB_PID=""
PREFIX=""
cleanup() {
  if [ -n "$HUB_PID" ]; then kill "$HUB_PID" 2>/dev/null || true; wait "$HUB_PID" 2>/dev/null || true; fi
  if [ -n "$PREFIX" ]; then delete_prefix "$PREFIX" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# submit_task ADDR: submits an `echo` task over the WebSocket (a development
# token from /dev/token), waits for it to finish, prints its id: the task
# endpoints are then checked against a task that exists.
submit_task() {
  "$VENV/bin/python" - "$1" <<'PY'
import asyncio, json, sys, urllib.request
import websockets

addr = sys.argv[1]
req = urllib.request.Request(f"http://{addr}/dev/token", data=b'{"user":"openapi"}',
                             headers={"content-type": "application/json"})
token = json.load(urllib.request.urlopen(req))["token"]

async def main():
    async with websockets.connect(f"ws://{addr}/ws?token={token}") as ws:
        await ws.send(json.dumps({"type": "task", "name": "echo", "payload": {"n": 1}, "ref": 1}))
        task_id = None
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame.get("type") == "ack" and frame.get("ref") == 1:
                task_id = frame["task_id"]
            if frame.get("type") == "task" and frame.get("status") in ("done", "failed"):
                print(task_id)
                return

asyncio.run(main())
PY
}

delete_prefix() { # prefix: every key under it
  "$VENV/bin/python" - "$REDIS_URL" "$1" <<'EOF'
import sys, redis
r = redis.Redis.from_url(sys.argv[1])
keys = list(r.scan_iter(match=sys.argv[2] + ":*", count=1000))
for i in range(0, len(keys), 500):
    r.delete(*keys[i:i + 500])
EOF
}

# check BROKER: starts a hub with that broker on a free port, runs
# Schemathesis against it, stops it.
check() {
  local broker=$1 config="$WORK/$1.toml"
  cat >"$config" <<EOF
[server]
host = "127.0.0.1"
port = 0
static_dir = ""
shutdown_grace_s = 1

[broker]
kind = "$broker"

[auth]
api_keys = ["$API_KEY"]
dev_tokens = true

[tasks.handlers.echo]
kind = "echo"
EOF
  if [ "$broker" = redis ]; then
    PREFIX="openapi-$$-$RANDOM"
    printf '\n[redis]\nurl = "%s"\nprefix = "%s"\n' "$REDIS_URL" "$PREFIX" >>"$config"
  fi
  RUST_LOG=warn "$BIN" serve --config "$config" >"$WORK/$broker.out" 2>"$WORK/$broker.err" &
  HUB_PID=$!
  local addr=""
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/^listening on //p' "$WORK/$broker.out")
    [ -n "$addr" ] && break
    kill -0 "$HUB_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$addr" ]; then
    echo "the hub did not start"; cat "$WORK/$broker.err"; exit 1
  fi
  # Ready (the Redis broker subscribes first).
  for _ in $(seq 1 100); do
    "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1])' \
      "http://$addr/health/ready" 2>/dev/null && break
    sleep 0.1
  done

  local task_id
  task_id=$(submit_task "$addr")
  # A body refused for its size (413) is refused too.
  cat >"$WORK/schemathesis.toml" <<EOF
[checks]
enabled = true

[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]

# A demo name is letters of any script, digits, _ . -: more than a schema
# pattern says portably, so a schema-valid name may be refused (400).
[[operations]]
include-path = "/dev/token"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path-regex = "^/api/tasks/"
parameters = { "path.id" = "$task_id" }
EOF

  log "schemathesis against the $broker broker (http://$addr, task $task_id)"
  local status=0
  "$VENV/bin/schemathesis" --config-file "$WORK/schemathesis.toml" run "http://$addr/openapi.yaml" \
    --url "http://$addr" \
    --header "Authorization: Bearer $API_KEY" \
    ${EXCLUDE:+--exclude-checks "$EXCLUDE"} \
    --max-examples "$MAX_EXAMPLES" \
    --seed 1 \
    --generation-database none \
    --workers 1 \
    --no-color \
    --suppress-health-check all || status=$?

  kill "$HUB_PID" 2>/dev/null || true
  wait "$HUB_PID" 2>/dev/null || true
  HUB_PID=""
  if grep -q "panicked" "$WORK/$broker.err"; then
    echo "the hub panicked:"; grep -A5 panicked "$WORK/$broker.err"; status=1
  fi
  if [ -n "$PREFIX" ]; then delete_prefix "$PREFIX"; PREFIX=""; fi
  return $status
}

check memory
if [ -n "${REDIS_URL:-}" ]; then
  check redis
else
  log "REDIS_URL unset: the Redis broker is not checked"
fi
