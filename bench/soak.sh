#!/usr/bin/env bash
# bench/soak.sh — churn soak: does the hub give back everything it takes?
#
# Starts one hub pinned to SERVER_CPU (Switchboard with BROKER=memory|redis; or the uWS
# peer with SYSTEM=uws, to validate the instrument) and runs `loadgen churn` on
# CLIENT_CPU. Each of CYCLES cycles: CLIENTS subscribers + PUBLISHERS publishers connect
# at CONNECT_RATE and join ROOMS rooms; RATE msg/s are published for PUBLISH_SECS; every
# member checks that it got every message of its room, in id order; then CLEAN_FRACTION
# of the clients close with 1000 and the rest drop the TCP connection (RST, no close
# frame). After each cycle /api/stats must report 0 connections (Switchboard only) and
# the hub's RSS is sampled: after the last cycle it must be within MAX_RSS_GROWTH % of
# the RSS after cycle 2. With the redis broker (a private redis-server on a free port),
# the connection registry (`{REDIS_PREFIX}:instance_conns:*`, `:conns:*`, `:conn_rooms:*`)
# and the room keys (`:presence:*`, `:members:*`) must be empty after the last cycle.
#
# Prints per-cycle lines and a final `soak summary: …` line; writes churn.json, the
# loadgen's output and the server log to $RESULTS. Exit status: 0 pass, 1 any leak,
# loss, disorder, RSS growth or crash, 2 usage.
#
# Usage: bench/soak.sh                          (builds Switchboard in release mode first)
#        BROKER=redis bench/soak.sh
#        SWITCHBOARD_BIN=/path/to/switchboard bench/soak.sh   (that binary, build nothing)
#        SYSTEM=uws CYCLES=3 CLIENTS=1000 bench/soak.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

# ---- sizes and knobs (environment overrides) --------------------------------------
SYSTEM=${SYSTEM:-switchboard}                   # switchboard | uws
BROKER=${BROKER:-memory}                        # memory | redis (Switchboard only)
CYCLES=${CYCLES:-10}
CLIENTS=${CLIENTS:-5000}                        # subscribers per cycle, plus PUBLISHERS
ROOMS=${ROOMS:-50}                              # -> 100 subscribers per room
PUBLISHERS=${PUBLISHERS:-10}                    # each joins the rooms it publishes to (5)
CONNECT_RATE=${CONNECT_RATE:-1000}              # connection attempts per second
RATE=${RATE:-100}                               # msg/s, all publishers together
PUBLISH_SECS=${PUBLISH_SECS:-5}
PAYLOAD=${PAYLOAD:-100}                         # bytes of the published data object
CLEAN_FRACTION=${CLEAN_FRACTION:-0.5}           # share closing with 1000; the rest RST
CLOSE_TIMEOUT=${CLOSE_TIMEOUT:-5}               # s a clean close waits for the server's close + FIN
SETTLE_SECS=${SETTLE_SECS:-1}                   # s after the disconnects, before stats and RSS
STATS_TIMEOUT=${STATS_TIMEOUT:-10}              # s for /api/stats connections to reach 0
MAX_RSS_GROWTH=${MAX_RSS_GROWTH:-10}            # % from the end of cycle 2 to the end of the last
MAX_CONNECT_FAILURES=${MAX_CONNECT_FAILURES:-0} # per cycle
REDIS_SETTLE_SECS=${REDIS_SETTLE_SECS:-10}      # s for the registry and presence keys to empty
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}                     # loadgen and redis-server
PORT=${PORT:-8000}
REDIS_PORT=${REDIS_PORT:-6391}                  # first port tried for the private redis-server
REDIS_PREFIX=${REDIS_PREFIX:-bench}             # Switchboard's redis.prefix, set by this script
JWT_SECRET=${JWT_SECRET:-bench-secret-not-for-production-0123456789}
API_KEY=${API_KEY:-bench-soak-key}              # Switchboard's auth.api_keys, set by this script
SWITCHBOARD_BIN=${SWITCHBOARD_BIN:-}
SWITCHBOARD_CONFIG=${SWITCHBOARD_CONFIG:-$BENCH_DIR/switchboard.toml}
RESULTS=${RESULTS:-$BENCH_DIR/results/soak-$(date +%Y%m%d-%H%M%S)}
LOADGEN=${LOADGEN:-$BENCH_DIR/loadgen/target/release/loadgen}

# log, stop_pid, port_open, wait_port, build_loadgen, uws_loads, start_uws, start_switchboard, start_redis
. "$BENCH_DIR/lib.sh"

case $SYSTEM in
  switchboard)
    case $BROKER in
      memory | redis) ;;
      *) echo "soak.sh: BROKER must be memory or redis (got '$BROKER')" >&2; exit 2 ;;
    esac
    if [ -z "$SWITCHBOARD_BIN" ]; then
      log "building Switchboard (cargo build --release; the first build takes about six minutes)"
      (cd "$ROOT" && cargo build --release --quiet --bin switchboard)
      SWITCHBOARD_BIN=$ROOT/target/release/switchboard
    fi
    [ -x "$SWITCHBOARD_BIN" ] || { echo "soak.sh: SWITCHBOARD_BIN=$SWITCHBOARD_BIN is not an executable" >&2; exit 2; }
    NAME=switchboard-$BROKER
    ;;
  uws) NAME=uws BROKER=none ;;
  *) echo "soak.sh: SYSTEM must be switchboard or uws (got '$SYSTEM')" >&2; exit 2 ;;
esac

# ---- process bookkeeping: everything is stopped by the PID we started -----------
SERVER_PID=""
REDIS_PID=""
LOADGEN_PID=""
TAIL_PID=""
cleanup() {
  stop_pid "$LOADGEN_PID" 2
  stop_pid "$TAIL_PID" 1
  stop_pid "$SERVER_PID" 5
  stop_pid "$REDIS_PID" 5
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$RESULTS"
log "results -> $RESULTS"
build_loadgen
if port_open "$PORT"; then
  echo "soak.sh: port $PORT is already in use; set PORT=... to a free one" >&2
  exit 2
fi

# ---- Redis (redis broker only): a private server on the first free port ------------
rcli() { redis-cli -p "$REDIS_PORT" --raw "$@"; }
if [ "$BROKER" = redis ]; then
  while port_open "$REDIS_PORT"; do REDIS_PORT=$((REDIS_PORT + 1)); done
  start_redis "$REDIS_PORT" "$RESULTS/redis.log"
  if ! wait_port "$REDIS_PORT" "$REDIS_PID" 10 || ! kill -0 "$REDIS_PID" 2>/dev/null; then
    echo "soak.sh: redis-server did not start (see $RESULTS/redis.log)" >&2
    exit 1
  fi
  log "redis-server pid $REDIS_PID on port $REDIS_PORT (cpu $CLIENT_CPU)"
fi

# ---- the hub --------------------------------------------------------------------------
case $SYSTEM in
  uws)
    uws_loads || { echo "soak.sh: the uWebSockets.js binary does not load on this Node" >&2; exit 2; }
    start_uws "$RESULTS/server.log"
    ;;
  switchboard)
    start_switchboard "$BROKER" "redis://127.0.0.1:$REDIS_PORT" "$RESULTS/server.log" \
      SWITCHBOARD__AUTH__API_KEYS="$API_KEY" SWITCHBOARD__REDIS__PREFIX="$REDIS_PREFIX"
    ;;
esac
if ! wait_port "$PORT" "$SERVER_PID" 120; then
  echo "soak.sh: $NAME did not open port $PORT (see $RESULTS/server.log)" >&2
  exit 1
fi
sleep 1
log "$NAME pid $SERVER_PID on port $PORT (cpu $SERVER_CPU)"

# ---- churn ----------------------------------------------------------------------------
args=(churn --url "ws://127.0.0.1:$PORT" --proto sb --secret "$JWT_SECRET"
  --cycles "$CYCLES" --clients "$CLIENTS" --rooms "$ROOMS" --publishers "$PUBLISHERS"
  --connect-rate "$CONNECT_RATE" --rate "$RATE" --duration "$PUBLISH_SECS" --payload "$PAYLOAD"
  --clean-fraction "$CLEAN_FRACTION" --close-timeout "$CLOSE_TIMEOUT" --settle "$SETTLE_SECS"
  --max-rss-growth "$MAX_RSS_GROWTH" --max-connect-failures "$MAX_CONNECT_FAILURES"
  --server-pid "$SERVER_PID" --label "$NAME" --json "$RESULTS/churn.json")
if [ "$SYSTEM" = switchboard ]; then
  args+=(--stats-url "http://127.0.0.1:$PORT/api/stats" --api-key "$API_KEY" --stats-timeout "$STATS_TIMEOUT")
else
  log "uws has no /api/stats: the leak check is skipped (RSS is still checked)"
fi
log "churn: $CYCLES cycles x ($CLIENTS + $PUBLISHERS clients) over $ROOMS rooms, $RATE msg/s for $PUBLISH_SECS s"
T0=$(date +%s)
taskset -c "$CLIENT_CPU" "$LOADGEN" "${args[@]}" >"$RESULTS/churn.txt" 2>&1 &
LOADGEN_PID=$!
tail -n +1 -f --pid="$LOADGEN_PID" "$RESULTS/churn.txt" &
TAIL_PID=$!
LG_RC=0
wait "$LOADGEN_PID" || LG_RC=$?
LOADGEN_PID=""
wait "$TAIL_PID" 2>/dev/null || true
TAIL_PID=""
log "loadgen exited $LG_RC after $(($(date +%s) - T0)) s"

SERVER_ALIVE=yes
kill -0 "$SERVER_PID" 2>/dev/null || SERVER_ALIVE=no

# ---- Redis leftovers (redis broker only) -----------------------------------------------
REDIS_CONNS=- PRESENCE_KEYS=- PRESENCE_MEMBERS=-
redis_leftovers() { # -> REDIS_CONNS, PRESENCE_KEYS (with members), PRESENCE_MEMBERS
  local key n
  REDIS_CONNS=0
  while IFS= read -r key; do
    [ -n "$key" ] || continue
    case $(rcli type "$key" || true) in
      hash) n=$(rcli hlen "$key" || true) ;;
      set) n=$(rcli scard "$key" || true) ;;
      none) n=0 ;;
      *) n=1 ;;
    esac
    case $n in '' | *[!0-9]*) n=1 ;; esac
    REDIS_CONNS=$((REDIS_CONNS + n))
  done < <(for family in instance_conns conns conn_rooms; do rcli --scan --pattern "$REDIS_PREFIX:$family:*"; done || true)
  PRESENCE_KEYS=0 PRESENCE_MEMBERS=0
  while IFS= read -r key; do
    [ -n "$key" ] || continue
    case $(rcli type "$key" || true) in
      hash) n=$(rcli hlen "$key" || true) ;;
      zset) n=$(rcli zcard "$key" || true) ;;
      set) n=$(rcli scard "$key" || true) ;;
      list) n=$(rcli llen "$key" || true) ;;
      none) n=0 ;;
      *) n=1 ;;
    esac
    case $n in '' | *[!0-9]*) n=1 ;; esac # an error counts as something left
    if [ "$n" -gt 0 ]; then
      PRESENCE_KEYS=$((PRESENCE_KEYS + 1))
      PRESENCE_MEMBERS=$((PRESENCE_MEMBERS + n))
    fi
  done < <(for family in presence members; do rcli --scan --pattern "$REDIS_PREFIX:$family:*"; done || true)
}
if [ "$BROKER" = redis ]; then
  for _ in $(seq 1 $((REDIS_SETTLE_SECS * 5))); do
    redis_leftovers
    [ "$REDIS_CONNS" = 0 ] && [ "$PRESENCE_MEMBERS" = 0 ] && break
    sleep 0.2
  done
  # an inventory of what is left under the prefix, by key family (history streams are expected)
  rcli --scan --pattern "$REDIS_PREFIX:*" | awk -F: '{print $2}' | sort | uniq -c >"$RESULTS/redis-keys.txt" || true
  log "redis after the last cycle: $REDIS_CONNS registry entries ($REDIS_PREFIX:instance_conns:*, :conns:*, :conn_rooms:*);" \
    "$PRESENCE_KEYS $REDIS_PREFIX:presence:* / :members:* keys with $PRESENCE_MEMBERS members;" \
    "keys by family: $(awk '{printf "%s%s %s", s, $2, $1; s=", "}' "$RESULTS/redis-keys.txt")"
fi

# ---- summary --------------------------------------------------------------------------
set +e
python3 - "$RESULTS/churn.json" "$NAME" "$LG_RC" "$SERVER_ALIVE" "$REDIS_CONNS" "$PRESENCE_KEYS" "$PRESENCE_MEMBERS" <<'PY'
import json, sys

path, name, lg_rc, alive, r_conns, p_keys, p_members = sys.argv[1:8]
try:
    with open(path) as f:
        d = json.load(f)
except (OSError, ValueError):
    d = None
fails = []
if alive != "yes":
    fails.append("the server exited (see server.log)")
if d is None:
    fails.append(f"loadgen failed before writing results (exit {lg_rc}; see churn.txt)")
    print(f"soak summary: {name}: " + "; ".join(fails) + " -> FAIL")
    sys.exit(1)
p, t, rss, cycles = d["params"], d["totals"], d["rss"], d["cycles"]
parts = [
    f"{t['cycles_ok']}/{p['cycles']} cycles ok",
    f"connected {t['connected']:,} (failures {t['connect_failures']})",
    f"delivered {t['received']:,}/{t['expected']:,}",
    f"out of order {t['out_of_order']}",
]
if p.get("stats_url"):
    parts.append(f"leaked max {t['leaked_max'] if t['leaked_max'] is not None else '?'}")
else:
    parts.append("leaks not checked")
if rss.get("checked"):
    parts.append(f"rss {rss['cycle2_kb']:,} -> {rss['last_kb']:,} KiB ({rss['growth_pct']:+.1f}%, max {rss['max_growth_pct']:g}%)")
else:
    parts.append(f"rss not checked ({rss.get('why')})")
for c in cycles:
    if not c.get("ok"):
        fails.append(f"cycle {c['cycle']}: " + "; ".join(c.get("failures") or ["failed"]))
if t["cycles_run"] < p["cycles"]:
    fails.append(f"only {t['cycles_run']} of {p['cycles']} cycles ran ({d.get('aborted')})")
if rss.get("checked") and not rss.get("ok"):
    fails.append(f"RSS grew {rss['growth_pct']:+.1f}% (max {rss['max_growth_pct']:g}%)")
if r_conns != "-":
    parts.append(f"redis connections {r_conns}, presence keys {p_keys} ({p_members} members)")
    if r_conns != "0":
        fails.append(f"{r_conns} entries left in the Redis connection registry")
    if p_keys != "0":
        fails.append(f"{p_keys} presence keys still hold {p_members} members")
if lg_rc != "0" and not fails:
    fails.append(f"loadgen exited {lg_rc}")
verdict = "PASS" if not fails else "FAIL (" + " | ".join(fails) + ")"
print(f"soak summary: {name}, {p['cycles']} cycles x {p['clients'] + p['publishers']:,} clients: "
      + "; ".join(parts) + f" -> {verdict}")
sys.exit(0 if not fails else 1)
PY
RC=$?
set -e
log "raw results in $RESULTS"
exit $RC
