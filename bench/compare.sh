#!/usr/bin/env bash
# bench/compare.sh — one side-by-side comparison of WebSocket hubs on this machine:
# Switchboard (both brokers) and three peers (peers/: the FastAPI tutorial hub,
# Socket.IO with its Redis adapter, uWebSockets.js). README.md beside this file
# explains every scenario and column.
#
# For each system: start it pinned to one core (taskset -c $SERVER_CPU), the load
# generator and a private Redis pinned to the other ($CLIENT_CPU), then run
#   1. idle:  IDLE_CLIENTS authenticated connections (each joins a room), server RSS
#             (process + children, VmRSS from /proc) before and after -> KB/connection;
#   2. fixed: fan-out at FIXED_RATE msg/s, a load every system sustains -> p50/p99;
#   3. sweep: fan-out at SWEEP_RATES msg/s over the same connections, stopping at the
#             first step with delivery ratio < MIN_RATIO or p99 > MAX_P99_MS
#             -> max sustained deliveries/s (the last good step).
# The server is restarted for every scenario so that none inherits another's state.
# Prints a Markdown table and writes raw JSON + server logs to $RESULTS.
#
# Usage: bench/compare.sh            (builds Switchboard in release mode first; ~20 minutes)
#        SYSTEMS="uws switchboard-memory" bench/compare.sh
#        QUICK=1 bench/compare.sh    (a short run: checks that every system starts and the
#                                     script runs end to end; its numbers mean little)
#        SWITCHBOARD_BIN=/path/to/switchboard bench/compare.sh   (use that binary, build nothing)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

# ---- sizes and knobs (environment overrides) --------------------------------------
if [ "${QUICK:-0}" = 1 ]; then
  : "${IDLE_CLIENTS:=500}" "${IDLE_HOLD:=1}" "${FANOUT_CLIENTS:=100}" "${FIXED_SECS:=2}"
  : "${SWEEP_RATES:=100,500}" "${STEP_SECS:=2}"
fi
SYSTEMS=${SYSTEMS:-"seed-fastapi socketio uws switchboard-memory switchboard-redis"}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}       # idle connections for KB/conn (max ~19,800: fd limit)
IDLE_RATE=${IDLE_RATE:-2000}              # connection attempts started per second
IDLE_HOLD=${IDLE_HOLD:-3}                 # seconds held after RSS is sampled
FANOUT_CLIENTS=${FANOUT_CLIENTS:-1000}    # subscribers
FANOUT_ROOMS=${FANOUT_ROOMS:-10}          # -> ~100 subscribers per room
FANOUT_PUBLISHERS=${FANOUT_PUBLISHERS:-10}
PAYLOAD=${PAYLOAD:-100}                   # bytes of the published data object
FIXED_RATE=${FIXED_RATE:-100}             # msg/s for the latency row (~10k deliveries/s)
FIXED_SECS=${FIXED_SECS:-10}
SWEEP_RATES=${SWEEP_RATES:-"100,200,300,500,700,1000,1500,2000,3000,5000,7000,10000,15000,20000,25000,30000,40000"}
STEP_SECS=${STEP_SECS:-4}                 # measured seconds per sweep step (+1 s warm-up)
MIN_RATIO=${MIN_RATIO:-0.99}
MAX_P99_MS=${MAX_P99_MS:-100}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT=${PORT:-8000}                        # every system listens here in turn
REDIS_PORT=${REDIS_PORT:-6390}            # private redis-server started by this script
JWT_SECRET=${JWT_SECRET:-bench-secret-not-for-production-0123456789}
SWITCHBOARD_BIN=${SWITCHBOARD_BIN:-}     # unset: cargo build --release, then target/release/switchboard
SWITCHBOARD_CONFIG=${SWITCHBOARD_CONFIG:-$BENCH_DIR/switchboard.toml}
RESULTS=${RESULTS:-$BENCH_DIR/results/$(date +%Y%m%d-%H%M%S)}
LOADGEN=${LOADGEN:-$BENCH_DIR/loadgen/target/release/loadgen}

mkdir -p "$RESULTS"
# log, stop_pid, rss_kb, port_open, wait_port, build_loadgen, start_uws, start_switchboard, start_redis
. "$BENCH_DIR/lib.sh"

# ---- process bookkeeping: everything is stopped by the PID we started -----------
SERVER_PID=""
REDIS_PID=""

cleanup() {
  stop_pid "$SERVER_PID" 5
  stop_pid "$REDIS_PID" 5
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- systems ------------------------------------------------------------------------
# Each system: proto, whether it needs Redis, a setup step and a start command.
proto_of() { case $1 in socketio) echo socketio ;; *) echo sb ;; esac; }

available() { # name -> 0 if it can run here; prints a reason otherwise
  case $1 in
    seed-fastapi | socketio) return 0 ;;
    uws)
      uws_loads || { echo "uWebSockets.js binary does not load on this Node"; return 1; }
      ;;
    switchboard-memory | switchboard-redis)
      [ -n "$SWITCHBOARD_BIN" ] || { echo "SWITCHBOARD_BIN is not set"; return 1; }
      [ -x "$SWITCHBOARD_BIN" ] || { echo "SWITCHBOARD_BIN=$SWITCHBOARD_BIN is not an executable"; return 1; }
      ;;
    *) echo "unknown system"; return 1 ;;
  esac
}

setup_system() {
  case $1 in
    seed-fastapi) "$BENCH_DIR/peers/seed-fastapi/run.sh" --setup ;;
    socketio) "$BENCH_DIR/peers/socketio/run.sh" --setup ;;
    uws) "$BENCH_DIR/peers/uws/run.sh" --setup ;;
    *) : ;;
  esac
}

start_system() { # name logfile -> sets SERVER_PID
  local name=$1 logf=$2
  local redis_url="redis://127.0.0.1:$REDIS_PORT"
  case $name in
    seed-fastapi)
      PORT=$PORT WORKERS=1 REDIS_URL="$redis_url/0" JWT_SECRET=$JWT_SECRET \
        taskset -c "$SERVER_CPU" "$BENCH_DIR/peers/seed-fastapi/run.sh" >"$logf" 2>&1 &
      SERVER_PID=$!
      ;;
    socketio)
      PORT=$PORT REDIS_URL=$redis_url JWT_SECRET=$JWT_SECRET \
        taskset -c "$SERVER_CPU" "$BENCH_DIR/peers/socketio/run.sh" >"$logf" 2>&1 &
      SERVER_PID=$!
      ;;
    uws) start_uws "$logf" ;;
    switchboard-memory | switchboard-redis)
      local kind=memory
      [ "$name" = switchboard-redis ] && kind=redis
      start_switchboard "$kind" "$redis_url" "$logf"
      ;;
  esac
}

needs_redis() { case $1 in seed-fastapi | socketio | switchboard-redis) return 0 ;; *) return 1 ;; esac; }

# ---- preparation ----------------------------------------------------------------------
log "results -> $RESULTS"
if [ -z "$SWITCHBOARD_BIN" ] && printf '%s\n' $SYSTEMS | grep -q '^switchboard-'; then
  log "building Switchboard (cargo build --release; the first build takes about six minutes)"
  (cd "$ROOT" && cargo build --release --quiet --bin switchboard)
  SWITCHBOARD_BIN=$ROOT/target/release/switchboard
fi
build_loadgen
if port_open "$PORT"; then
  echo "port $PORT is already in use; set PORT=... to a free one" >&2
  exit 1
fi

RUN_LIST=""
: >"$RESULTS/skipped.txt"
for sys_name in $SYSTEMS; do
  if reason=$(available "$sys_name"); then
    log "setting up $sys_name"
    if setup_system "$sys_name" >"$RESULTS/$sys_name.setup.log" 2>&1; then
      RUN_LIST="$RUN_LIST $sys_name"
    else
      log "skip $sys_name: setup failed (see $RESULTS/$sys_name.setup.log)"
      echo "$sys_name	setup failed" >>"$RESULTS/skipped.txt"
    fi
  else
    log "skip $sys_name: $reason"
    echo "$sys_name	$reason" >>"$RESULTS/skipped.txt"
  fi
done

if [ -n "$RUN_LIST" ] && printf '%s\n' $RUN_LIST | grep -qE '^(seed-fastapi|socketio|switchboard-redis)$'; then
  if port_open "$REDIS_PORT"; then
    echo "port $REDIS_PORT is already in use; set REDIS_PORT=... to a free one" >&2
    exit 1
  fi
  start_redis "$REDIS_PORT" "$RESULTS/redis.log"
  wait_port "$REDIS_PORT" "$REDIS_PID" 10 || { echo "redis-server did not start" >&2; exit 1; }
  log "redis-server pid $REDIS_PID on port $REDIS_PORT (cpu $CLIENT_CPU)"
fi

cat >"$RESULTS/params.json" <<EOF
{"systems":"$RUN_LIST","idle_clients":$IDLE_CLIENTS,"idle_rate":$IDLE_RATE,
 "fanout_clients":$FANOUT_CLIENTS,"fanout_rooms":$FANOUT_ROOMS,"fanout_publishers":$FANOUT_PUBLISHERS,
 "payload":$PAYLOAD,"fixed_rate":$FIXED_RATE,"fixed_secs":$FIXED_SECS,"sweep_rates":"$SWEEP_RATES",
 "step_secs":$STEP_SECS,"min_ratio":$MIN_RATIO,"max_p99_ms":$MAX_P99_MS,
 "server_cpu":$SERVER_CPU,"client_cpu":$CLIENT_CPU,"date":"$(date -Is)","host":"$(uname -srm)"}
EOF

# ---- scenarios ------------------------------------------------------------------------
boot() { # name scenario -> starts the server and waits for its port
  local name=$1 sc=$2
  if needs_redis "$name"; then redis-cli -p "$REDIS_PORT" flushall >/dev/null; fi
  start_system "$name" "$RESULTS/$name.$sc.server.log"
  if ! wait_port "$PORT" "$SERVER_PID" 120; then
    log "$name did not open port $PORT (see $RESULTS/$name.$sc.server.log)"
    stop_pid "$SERVER_PID" 2
    SERVER_PID=""
    return 1
  fi
  sleep 1
}

halt() {
  stop_pid "$SERVER_PID" 10
  SERVER_PID=""
  # let the kernel retire the closed sockets before the next server starts
  sleep 1
}

lg() { taskset -c "$CLIENT_CPU" "$LOADGEN" "$@"; }

run_idle() {
  local name=$1 proto=$2
  local out="$RESULTS/$name.idle.json" ready="$RESULTS/.ready.$name"
  boot "$name" idle || return 0
  local before after lpid
  before=$(rss_kb "$SERVER_PID")
  rm -f "$ready"
  lg connect --url "ws://127.0.0.1:$PORT" --proto "$proto" --secret "$JWT_SECRET" \
    --clients "$IDLE_CLIENTS" --rate "$IDLE_RATE" --hold $((IDLE_HOLD + 3)) \
    --ready-file "$ready" --label "$name" --json "$out" >"$RESULTS/$name.idle.txt" 2>&1 &
  lpid=$!
  while [ ! -f "$ready" ] && kill -0 "$lpid" 2>/dev/null; do sleep 0.2; done
  sleep 2 # let the server finish the last joins and settle
  after=$(rss_kb "$SERVER_PID")
  wait "$lpid" || log "$name idle: loadgen exited non-zero"
  rm -f "$ready"
  printf '{"rss_before_kb":%s,"rss_after_kb":%s}\n' "$before" "$after" >"$RESULTS/$name.idle.rss.json"
  log "$name idle: rss ${before} -> ${after} KiB; $(grep -E '^connected' "$RESULTS/$name.idle.txt" || true)"
  halt
}

run_fanout() { # name proto scenario extra-args...
  local name=$1 proto=$2 sc=$3
  shift 3
  boot "$name" "$sc" || return 0
  lg fanout --url "ws://127.0.0.1:$PORT" --proto "$proto" --secret "$JWT_SECRET" \
    --clients "$FANOUT_CLIENTS" --rooms "$FANOUT_ROOMS" --publishers "$FANOUT_PUBLISHERS" \
    --payload "$PAYLOAD" --warmup 1 --min-ratio "$MIN_RATIO" --max-p99-ms "$MAX_P99_MS" \
    --server-pid "$SERVER_PID" --label "$name" --json "$RESULTS/$name.$sc.json" "$@" \
    >"$RESULTS/$name.$sc.txt" 2>&1 || log "$name $sc: loadgen exited non-zero (see $RESULTS/$name.$sc.txt)"
  grep -vE '^(fanout:|connected)' "$RESULTS/$name.$sc.txt" | sed "s/^/    [$name $sc] /" >&2 || true
  halt
}

T0=$(date +%s)
for sys_name in $RUN_LIST; do
  sys_proto=$(proto_of "$sys_name")
  log "=== $sys_name (proto $sys_proto) ==="
  run_idle "$sys_name" "$sys_proto"
  run_fanout "$sys_name" "$sys_proto" fixed --rate "$FIXED_RATE" --duration "$FIXED_SECS"
  run_fanout "$sys_name" "$sys_proto" sweep --rates "$SWEEP_RATES" --duration "$STEP_SECS"
done
log "all systems done in $(($(date +%s) - T0)) s"

# ---- table ----------------------------------------------------------------------------
python3 - "$RESULTS" $RUN_LIST <<'PY'
import json, os, sys

res, systems = sys.argv[1], sys.argv[2:]
params = json.load(open(os.path.join(res, "params.json")))

def load(name):
    try:
        with open(os.path.join(res, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def fmt(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, (int, float)):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)

rows, summary = [], {}
for s in systems:
    idle, rss = load(f"{s}.idle.json"), load(f"{s}.idle.rss.json")
    fixed, sweep = load(f"{s}.fixed.json"), load(f"{s}.sweep.json")
    notes = []
    kb = conns = None
    if idle and rss and idle.get("clients_connected"):
        conns = idle["clients_connected"]
        kb = (rss["rss_after_kb"] - rss["rss_before_kb"]) * 1024 / 1000 / conns
        if idle.get("clients_failed"):
            notes.append(f"{idle['clients_failed']} connects failed")
    best = sweep.get("max_sustained") if sweep else None
    dps = best.get("deliveries_per_s") if best else None
    rate = best.get("rate") if best else None
    if sweep:
        steps = sweep.get("steps") or []
        last = steps[-1] if steps else None
        if last and last.get("ok") and len(steps) == len(sweep["params"]["rates"]):
            notes.append("every sweep step sustained: raise SWEEP_RATES")
        if last and not last.get("ok"):
            lat = last.get("latency_ms") or {}
            srv, lgc = last.get("server_cpu_pct"), last.get("loadgen_cpu_pct")
            notes.append(
                f"failed at {last['rate']:g} msg/s: ratio {last['delivery_ratio']:.3f}, "
                f"p99 {fmt(lat.get('p99'))} ms, closes {last.get('closes', 0)}, "
                f"CPU server {fmt(srv, 0)}% / loadgen {fmt(lgc, 0)}%"
            )
            if lgc is not None and lgc >= 90 and (srv is None or srv < 90):
                notes.append("loadgen saturated before the server: result is client-bound")
        elif best and best.get("loadgen_cpu_pct", 0) >= 90:
            notes.append(f"loadgen at {best['loadgen_cpu_pct']:.0f}% CPU at the last step: may be client-bound")
        if best is None:
            notes.append("no step sustained")
    p50 = p99 = None
    if fixed and fixed.get("steps"):
        st = fixed["steps"][0]
        lat = st.get("latency_ms") or {}
        p50, p99 = lat.get("p50"), lat.get("p99")
        if not st.get("ok"):
            notes.append(f"fixed load not sustained (ratio {st['delivery_ratio']:.3f})")
    summary[s] = {
        "kb_per_conn": kb, "idle_connections": conns,
        "connect_rate_per_s": idle.get("connect_rate_per_s") if idle else None,
        "max_deliveries_per_s": dps, "max_rate_msgs_per_s": rate,
        "max_step_p99_ms": (best or {}).get("latency_ms", {}).get("p99") if best else None,
        "fixed_p50_ms": p50, "fixed_p99_ms": p99,
        "server_cpu_pct_at_max": (best or {}).get("server_cpu_pct"),
        "loadgen_cpu_pct_at_max": (best or {}).get("loadgen_cpu_pct"),
        "notes": notes,
    }
    rows.append(s)

seed = summary.get("seed-fastapi", {}).get("max_deliveries_per_s")
hdr = (
    f"| system | KB/conn (idle {params['idle_clients']:,}) | connects/s | "
    f"max sustained deliveries/s (msg/s) | × seed | p50 ms @ {params['fixed_rate']} msg/s | "
    f"p99 ms @ {params['fixed_rate']} msg/s | notes |"
)
lines = [hdr, "|" + "---|" * 8]
for s in rows:
    r = summary[s]
    dps = r["max_deliveries_per_s"]
    xs = f"{dps / seed:.1f}×" if (dps and seed) else "–"
    lines.append(
        f"| {s} | {fmt(r['kb_per_conn'])} | {fmt(r['connect_rate_per_s'], 0)} | "
        f"{fmt(dps)} ({fmt(r['max_rate_msgs_per_s'], 0)}) | {xs} | {fmt(r['fixed_p50_ms'], 2)} | "
        f"{fmt(r['fixed_p99_ms'], 2)} | {'; '.join(r['notes'])} |"
    )
skipped = open(os.path.join(res, "skipped.txt")).read().strip().splitlines()
foot = [
    "",
    f"Fan-out: {params['fanout_clients']} subscribers in {params['fanout_rooms']} rooms + "
    f"{params['fanout_publishers']} publishers, {params['payload']}-byte data; a step is sustained when "
    f"delivery ratio ≥ {params['min_ratio']} and p99 ≤ {params['max_p99_ms']} ms "
    f"({params['step_secs']} s per step). Server on CPU {params['server_cpu']}, "
    f"loadgen + Redis on CPU {params['client_cpu']}. {params['date']}",
]
for line in skipped:
    name, _, why = line.partition("\t")
    foot.append(f"Skipped {name}: {why}")
table = "\n".join(lines + foot)
print()
print(table)
with open(os.path.join(res, "table.md"), "w") as f:
    f.write(table + "\n")
with open(os.path.join(res, "summary.json"), "w") as f:
    json.dump({"params": params, "systems": summary}, f, indent=2)
PY
log "raw results in $RESULTS"
