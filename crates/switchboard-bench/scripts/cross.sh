#!/usr/bin/env bash
# Two instances through one Redis at scale: hub 1 holds the subscribers
# (N over N/100 rooms), hub 2 the publishers (one per room) and idle
# connections up to N, so each hub holds N; every delivery crosses Redis.
# Prints the fan-out's verdict, latency and throughput, each process's CPU
# over the fan-out and the hubs' RSS. Needs the release build of both
# binaries:
#   cargo build --release --workspace
#   crates/switchboard-bench/scripts/cross.sh [N] [msg/s] [seconds]
# Default 9,000 per hub, 1,000 msg/s (100,000 deliveries/s), 10 s.
# Placement (taskset): HUB1_CPU (0) for hub 1; OTHERS_CPU (1) for hub 2,
# Redis and the bench. WORKERS (1) per hub.
# Uses a private redis-server on port 16391 and ports 18201/18202; stops
# everything it started by PID.
set -u
N=${1:-9000}
RATE=${2:-1000}
SECS=${3:-10}
HUB1_CPU=${HUB1_CPU:-0}
OTHERS_CPU=${OTHERS_CPU:-1}
WORKERS=${WORKERS:-1}
ROOMS=$((N / 100))
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
B=$ROOT/target/release
DIR=$(mktemp -d)
taskset -c "$OTHERS_CPU" redis-server --port 16391 --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
RPID=$!
sleep 0.5
export SWITCHBOARD__BROKER__KIND=redis SWITCHBOARD__REDIS__URL=redis://127.0.0.1:16391 \
  SWITCHBOARD__REDIS__PREFIX=x SWITCHBOARD__SERVER__WORKERS=$WORKERS
SWITCHBOARD__SERVER__PORT=18201 taskset -c "$HUB1_CPU" "$B/switchboard" serve --config "$ROOT/config/bench.toml" >/dev/null 2>"$DIR/hub1.log" &
H1=$!
SWITCHBOARD__SERVER__PORT=18202 taskset -c "$OTHERS_CPU" "$B/switchboard" serve --config "$ROOT/config/bench.toml" >/dev/null 2>"$DIR/hub2.log" &
H2=$!
sleep 1
taskset -c "$OTHERS_CPU" "$B/switchboard-bench" connections --url ws://127.0.0.1:18202 \
  --count $((N - ROOMS)) --concurrency 200 --hold-s $((SECS + 120)) --api-key bench-key >"$DIR/idle.log" 2>&1 &
IDLE=$!
for _ in $(seq 1 120); do grep -q "with all connections open" "$DIR/idle.log" && break; sleep 0.5; done
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
c1=$(cpu $H1); c2=$(cpu $H2); cr=$(cpu $RPID); t0=$(date +%s.%N)
taskset -c "$OTHERS_CPU" "$B/switchboard-bench" fanout --url ws://127.0.0.1:18201 --publish-url ws://127.0.0.1:18202 \
  --subscribers "$N" --publishers "$ROOMS" --rooms "$ROOMS" --rate "$RATE" --messages $((RATE * SECS)) \
  --connect-concurrency 200 --api-key bench-key >"$DIR/fanout.log" 2>&1
t1=$(date +%s.%N)
pct() { python3 -c "print(round(($1 - $2) / ($t1 - $t0), 1))"; }
echo "cpu % over the fan-out run (connecting included): hub 1 $(pct "$(cpu $H1)" "$c1"), hub 2 $(pct "$(cpu $H2)" "$c2"), redis $(pct "$(cpu $RPID)" "$cr")"
echo "rss: hub 1 $(awk '/VmRSS/ {print $2, $3}' /proc/$H1/status), hub 2 $(awk '/VmRSS/ {print $2, $3}' /proc/$H2/status)"
grep -E "^published|^deliveries|missing|throughput|latency \(pub|server-side|cpu while|^result" "$DIR/fanout.log"
kill "$IDLE" 2>/dev/null
sleep 1
kill "$H1" "$H2" "$RPID" 2>/dev/null
wait 2>/dev/null
echo "logs: $DIR"
