#!/usr/bin/env bash
# crates/switchboard-bench/scripts/tasks.sh — Switchboard's async tasks on one machine, the way
# bench/peers/tasks measures Celery and BullMQ: an `echo` task with a 100-byte
# payload, the worker side (here: the hub with tasks.workers = W) under `taskset -c 0`, the
# client (switchboard-bench tasks) and redis-server under `taskset -c 1`; N=5000 throughput
# runs, then fixed rates 1000/s and 200/s for 5 s each, latency from each task's scheduled
# time to its `done`. Prints one Markdown table (W = 1, 2, 4) and, with PEERS=1, runs the
# peers' run.sh (bench/peers/tasks/run.sh) in the same invocation and prints theirs.
#
#   crates/switchboard-bench/scripts/tasks.sh               # builds (cargo build --release --workspace), ~2 minutes
#   PEERS=1 crates/switchboard-bench/scripts/tasks.sh       # plus Celery and BullMQ (bench/peers/tasks), ~3 more minutes
#   BUILD=0 WORKERS="2" N=2000 crates/switchboard-bench/scripts/tasks.sh
#
# Overrides: WORKERS ("1 2 4"), N (5000), RUNS (2), RATE (1000), LOW_RATE (200, 0 skips it),
# SECS (5), WARMUP (2000), CLIENTS (50), WINDOW (32), DRAIN_S (30), PAYLOAD_BYTES (100),
# WORKER_CPU (0), CLIENT_CPU (1), HUB_LOG (RUST_LOG of the hub), BIN_DIR (target/release),
# BUILD (1), PEERS (0), OUT (a new temporary directory).
# Starts its own redis-server on a free port (--save "" --appendonly no), FLUSHALLs it before
# each system, and stops everything it started by PID (TERM, then KILL), never by name.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)

WORKERS=${WORKERS:-"1 2 4"}
N=${N:-5000}
RUNS=${RUNS:-2}
RATE=${RATE:-1000}
LOW_RATE=${LOW_RATE:-200}
SECS=${SECS:-5}
WARMUP=${WARMUP:-2000}
CLIENTS=${CLIENTS:-50}
WINDOW=${WINDOW:-32}
DRAIN_S=${DRAIN_S:-30}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-100}
WORKER_CPU=${WORKER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
HUB_LOG=${HUB_LOG:-"info,switchboard::tasks=debug"}
BIN_DIR=${BIN_DIR:-$ROOT/target/release}
BUILD=${BUILD:-1}
PEERS=${PEERS:-0}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/switchboard-tasks.XXXXXX")}
mkdir -p "$OUT"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- processes (stopped by PID) -------------------------------------------------------
descendants() { local k; for k in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do echo "$k"; descendants "$k"; done; }
stop_pid() { # pid [grace s]: TERM it and its descendants, KILL what is left after grace
  local pid=${1:-} grace=${2:-10} all p
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  all="$pid $(descendants "$pid" | tr '\n' ' ')"
  kill -TERM $all 2>/dev/null || true
  for _ in $(seq 1 $((grace * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  for p in $all; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true; done
  wait "$pid" 2>/dev/null || true
}
REDIS_PID= HUB_PID= PEERS_PID=
cleanup() {
  stop_pid "$PEERS_PID" 15; stop_pid "$HUB_PID" 15; stop_pid "$REDIS_PID" 5
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { # a port nothing listens on, from the ephemeral range
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 30000))
    port_open "$p" || { echo "$p"; return 0; }
  done
  echo "no free port found" >&2; return 1
}

# ---- build -----------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  log "cargo build --release --workspace"
  (cd "$ROOT" && cargo build --release --workspace)
fi
for b in switchboard switchboard-bench; do
  [ -x "$BIN_DIR/$b" ] || { echo "$BIN_DIR/$b missing: cargo build --release --workspace" >&2; exit 1; }
done

# ---- redis -----------------------------------------------------------------------------
REDIS_PORT=$(free_port)
R() { redis-cli -p "$REDIS_PORT" "$@"; }
taskset -c "$CLIENT_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
  --appendonly no --daemonize no --dir "$OUT" >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 50); do [ "$(R ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
[ "$(R ping 2>/dev/null)" = PONG ] || { echo "redis-server did not start, see $OUT/redis.log" >&2; exit 1; }
REDIS_VERSION=$(redis-server --version | sed -n 's/.*v=\([0-9.]*\).*/\1/p')
log "redis-server $REDIS_VERSION pid $REDIS_PID on port $REDIS_PORT, CPU $CLIENT_CPU; results in $OUT"

# ---- the hub's configuration: config/bench.toml plus an echo handler --------------------
HUB_TOML=$OUT/hub.toml
cp "$ROOT/config/bench.toml" "$HUB_TOML"
if ! grep -q '^\[tasks\.handlers\.echo\]' "$HUB_TOML"; then
  printf '\n[tasks.handlers.echo]\nkind = "echo"\n' >>"$HUB_TOML"
fi

RATES=$RATE
[ "$LOW_RATE" != 0 ] && RATES="$RATES,$LOW_RATE"

start_hub() { # workers logprefix -> HUB_PID, HUB_PORT
  SWITCHBOARD__SERVER__PORT=0 \
  SWITCHBOARD__BROKER__KIND=redis \
  SWITCHBOARD__REDIS__URL="redis://127.0.0.1:$REDIS_PORT" \
  SWITCHBOARD__TASKS__WORKERS="$1" \
  SWITCHBOARD__TASKS__MAX_PENDING_PER_USER=100000 \
  RUST_LOG="$HUB_LOG" \
    taskset -c "$WORKER_CPU" "$BIN_DIR/switchboard" serve --config "$HUB_TOML" >"$2.out" 2>"$2.log" &
  HUB_PID=$!
  HUB_PORT=
  for _ in $(seq 1 100); do
    HUB_PORT=$(sed -n 's/^listening on .*:\([0-9][0-9]*\)$/\1/p' "$2.out" 2>/dev/null | head -1)
    [ -n "$HUB_PORT" ] && return 0
    kill -0 "$HUB_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "the hub did not start; see $2.log:" >&2; tail -20 "$2.log" >&2; exit 1
}

FAILED=0
for w in $WORKERS; do
  R flushall >/dev/null
  R config resetstat >/dev/null
  prefix=$OUT/switchboard-w$w
  start_hub "$w" "$prefix.hub"
  log "switchboard w=$w: hub pid $HUB_PID on port $HUB_PORT, CPU $WORKER_CPU (tasks.workers = $w)"
  rc=0
  taskset -c "$CLIENT_CPU" "$BIN_DIR/switchboard-bench" tasks --url "ws://127.0.0.1:$HUB_PORT" \
    --clients "$CLIENTS" --window "$WINDOW" --payload-bytes "$PAYLOAD_BYTES" --warmup "$WARMUP" \
    --tasks "$N" --runs "$RUNS" --rates "$RATES" --duration-s "$SECS" --drain-s "$DRAIN_S" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" --server-pid "$HUB_PID" --redis-pid "$REDIS_PID" \
    --json "$prefix.json" >"$prefix.txt" 2>&1 || rc=$?
  sed 's/^/    /' "$prefix.txt" >&2
  stop_pid "$HUB_PID" 15
  HUB_PID=
  [ "$rc" = 0 ] || { FAILED=1; log "switchboard w=$w: the bench exited $rc (see $prefix.txt)"; }
  # What the hub said about its tasks (warnings, errors, take-overs, failed takes).
  sed 's/\x1b\[[0-9;]*m//g' "$prefix.hub.log" | grep -E ' (WARN|ERROR) |taking over|taking tasks failed' \
    | grep -v 'DEVELOPMENT secret' >"$prefix.hub-tasks.log" || true
  if [ -s "$prefix.hub-tasks.log" ]; then
    failed_takes=$(grep -c 'taking tasks failed' "$prefix.hub-tasks.log" || true)
    takeovers=$(sed -n 's/.*taking over tasks.* tasks=\([0-9]*\).*/\1/p; s/.*tasks=\([0-9]*\).*taking over tasks.*/\1/p' \
      "$prefix.hub-tasks.log" | awk '{s += $1} END {print s + 0}')
    warnings=$(grep -cE ' (WARN|ERROR) ' "$prefix.hub-tasks.log" || true)
    log "switchboard w=$w: hub log: $failed_takes × 'taking tasks failed', $takeovers tasks taken over, $warnings warnings/errors ($prefix.hub-tasks.log):"
    head -3 "$prefix.hub-tasks.log" | sed 's/^/    /' >&2
  fi
done
stop_pid "$REDIS_PID" 5
REDIS_PID=

# ---- the peers, in the same invocation ---------------------------------------------------
PEERS_OUT=
if [ "$PEERS" = 1 ]; then
  PEERS_OUT=$OUT/peers
  log "peers: bench/peers/tasks/run.sh (setup on first use: venv, npm ci)"
  REDIS_PORT=$(free_port) N=$N RUNS=$RUNS RATE=$RATE LOW_RATE=$LOW_RATE SECS=$SECS WARMUP=$WARMUP \
    WORKER_CPU=$WORKER_CPU CLIENT_CPU=$CLIENT_CPU OUT=$PEERS_OUT \
    bash "$ROOT/bench/peers/tasks/run.sh" >"$OUT/peers.txt" 2>"$OUT/peers.log" &
  PEERS_PID=$!
  rc=0; wait "$PEERS_PID" || rc=$?
  PEERS_PID=
  [ "$rc" = 0 ] || { FAILED=1; log "peers: run.sh exited $rc (see $OUT/peers.log)"; tail -20 "$OUT/peers.log" >&2; }
fi

# ---- the table ---------------------------------------------------------------------------
python3 - "$OUT" "$WORKERS" "$N" "$RUNS" "$RATE" "$LOW_RATE" "$WORKER_CPU" "$CLIENT_CPU" "$REDIS_VERSION" "$CLIENTS" "$WINDOW" <<'PY' | tee "$OUT/table.md"
import json, pathlib, sys
out, workers, n, runs, rate, low, wcpu, ccpu, redis_v, clients, window = sys.argv[1:]
out = pathlib.Path(out)
rate, low = float(rate), float(low)

def fmt_rate(x):
    return "—" if x is None else f"{x:,.0f}"

def fmt_ms(x):
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"

def cpu(p):
    c = p.get("cpu", {})
    busy = c.get("cpu_busy", {})
    s = f"CPU{wcpu} {busy.get('cpu' + wcpu, 0):.0f}%, CPU{ccpu} {busy.get('cpu' + ccpu, 0):.0f}%"
    if c.get("redis") is not None:
        s += f" (redis {c['redis']:.0f}%)"
    if c.get("server") is not None:
        s += f", hub {c['server']:.0f}%"
    return s

def lat(p):
    if p is None:
        return "—"
    q = p.get("latency")
    s = "—" if q is None else f"{fmt_ms(q['p50_ms'])} / {fmt_ms(q['p99_ms'])}"
    if p["done"] < p["planned"]:
        s += f" ({p['done']}/{p['planned']} done)"
    return s

rows = []
for w in workers.split():
    f = out / f"switchboard-w{w}.json"
    if not f.exists():
        rows.append([f"switchboard w={w}", w, "no results (see switchboard-w%s.txt)" % w, "—", "—", ""])
        continue
    r = json.loads(f.read_text())
    ph = r["phases"]
    tps = [p for p in ph if p["kind"] == "throughput"]
    rates = {p["rate"]: p for p in ph if p["kind"] == "rate"}
    hi, lo = rates.get(rate), rates.get(low)
    thr = " / ".join(fmt_rate(p["tasks_per_s"]) for p in tps) or "—"
    notes = []
    if tps:
        notes.append(f"max: {cpu(tps[-1])}")
    if hi is not None:
        s = f"{rate:,.0f}/s: {cpu(hi)}"
        if hi.get("latency") and hi["latency"]["p50_ms"] > 100:
            s += ", **saturated** (backlog grows)"
        if hi.get("submit_per_s") and hi["submit_per_s"] < 0.98 * rate:
            s += f", client sent only {hi['submit_per_s']:,.0f}/s"
        notes.append(s)
    if r.get("redis"):
        notes.append(f"{r['redis']['cmds_per_task']:.0f} Redis cmds/task")
    steal = max([v for p in ph for v in p.get("cpu", {}).get("cpu_steal", {}).values()] or [0])
    if steal >= 1:
        notes.append(f"hypervisor steal up to {steal:.0f}%")
    lost = sum(p["lost"] for p in ph)
    wrong = sum(p["wrong"] for p in ph)
    slow = sum(p.get("slow", 0) for p in ph)
    failed = sum(sum(p["failed"].values()) + sum(p["refused"].values()) for p in ph)
    if lost:
        notes.append(f"**{lost} tasks lost** (no done within the drain time)")
    if slow:
        notes.append(f"**{slow} tasks took over 10 s**")
    if wrong:
        notes.append(f"**{wrong} wrong results**")
    if failed:
        notes.append(f"**{failed} failed/refused**")
    rows.append([f"switchboard w={w}", f"hub, tasks.workers = {w}", thr, lat(hi), lat(lo), " · ".join(notes)])

head = ["system", "workers", f"throughput tasks/s (N={int(n):,}, {runs} runs)",
        f"p50 / p99 ms at {rate:,.0f} tasks/s offered", f"p50 / p99 ms at {low:,.0f}/s",
        f"notes (worker on CPU {wcpu}, client + Redis on CPU {ccpu})"]
lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
lines += ["", f"Switchboard: the hub (broker redis, `tasks.workers` = W, echo handler) under `taskset -c {wcpu}`; "
          f"`switchboard-bench tasks` ({clients} connections, one user each, at most {window} unfinished tasks per "
          f"connection in the throughput runs) and redis-server {redis_v} (`--save \"\" --appendonly no`) under "
          f"`taskset -c {ccpu}`. CPU % per core from /proc/stat (steal not busy) over the last throughput run (max) "
          "and the submit window of the fixed-rate run; redis and hub % are shares of one core (/proc/PID/stat). "
          "Latency: each task's scheduled submit time to the client seeing its `done`. Redis cmds/task: "
          "total_commands_processed over every task of the run, warm-up included (the bench's INFOs not counted)."]
peers = out / "peers" / "table.md"
if peers.exists():
    lines += ["", "Peers, same invocation (bench/peers/tasks/run.sh):", "", peers.read_text().strip()]
print("\n".join(lines))
PY
log "results in $OUT"
exit "$FAILED"
