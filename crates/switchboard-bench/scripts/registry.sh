#!/usr/bin/env bash
# Restore and reaping at scale: instance "a" holds N connections, each a
# member of one of 100 rooms; Redis is flushed (instance "a" reconciles its
# registry back), then "a" is SIGKILLed (instance "b" reaps it). Prints the
# two log lines with the times. Needs the release build of both binaries:
#   cargo build --release --workspace
#   crates/switchboard-bench/scripts/registry.sh [connections-per-bench-process] [processes]
#   MODE=cluster crates/switchboard-bench/scripts/registry.sh     # on a 3-primary Redis Cluster
# Default 2 x 9750 = 19,500 connections (a process may open 20,000 files here).
# Uses private redis-servers on ports 16390 (standalone) or 16391-16393
# (cluster) and ports 18101/18102; stops everything it started by PID.
set -u
PER=${1:-9750}
PROCS=${2:-2}
MODE=${MODE:-standalone}
TOTAL=$((PER * PROCS))
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
B=$ROOT/target/release
DIR=$(mktemp -d)
RPIDS=()
if [ "$MODE" = cluster ]; then
  PORTS=(16391 16392 16393)
  for p in "${PORTS[@]}"; do
    redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
      --cluster-enabled yes --cluster-config-file "nodes-$p.conf" >"$DIR/redis-$p.log" 2>&1 &
    RPIDS+=($!)
  done
  sleep 0.5
  redis-cli --cluster create 127.0.0.1:16391 127.0.0.1:16392 127.0.0.1:16393 --cluster-yes >/dev/null
  for _ in $(seq 1 60); do
    redis-cli -p 16391 CLUSTER INFO | grep -q cluster_state:ok && break
    sleep 0.5
  done
  URL=redis://127.0.0.1:16391,redis://127.0.0.1:16392,redis://127.0.0.1:16393
  CLI=(redis-cli -c -p 16391)
  flush() { for p in "${PORTS[@]}"; do redis-cli -p "$p" FLUSHALL >/dev/null; done; }
else
  redis-server --port 16390 --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
  RPIDS+=($!)
  sleep 0.5
  URL=redis://127.0.0.1:16390
  CLI=(redis-cli -p 16390)
  flush() { redis-cli -p 16390 FLUSHALL >/dev/null; }
fi
export SWITCHBOARD__BROKER__KIND=redis SWITCHBOARD__REDIS__MODE=$MODE SWITCHBOARD__REDIS__URL=$URL
export SWITCHBOARD__REDIS__PREFIX=m RUST_LOG=info
SWITCHBOARD__SERVER__INSTANCE_ID=a SWITCHBOARD__SERVER__PORT=18101 \
  "$B/switchboard" serve --config "$ROOT/config/bench.toml" >/dev/null 2>"$DIR/a.log" &
APID=$!
SWITCHBOARD__SERVER__INSTANCE_ID=b SWITCHBOARD__SERVER__PORT=18102 \
  "$B/switchboard" serve --config "$ROOT/config/bench.toml" >/dev/null 2>"$DIR/b.log" &
BPID=$!
sleep 1
BENCH=()
for _ in $(seq 1 "$PROCS"); do
  "$B/switchboard-bench" connections --url ws://127.0.0.1:18101 --count "$PER" --concurrency 200 \
    --rooms 100 --hold-s 90 >/dev/null 2>&1 &
  BENCH+=($!)
done
held() { "${CLI[@]}" HLEN 'm:instance_conns:{a}'; }
for _ in $(seq 1 120); do [ "$(held)" -ge "$TOTAL" ] && break; sleep 0.5; done
echo "mode $MODE; registered: $(held) of $TOTAL"
flush
for _ in $(seq 1 60); do [ "$(held)" -ge "$TOTAL" ] && break; sleep 0.5; done
sleep 2
grep -a "registry reconciled" "$DIR/a.log" | tail -1
kill -KILL "$APID"
for _ in $(seq 1 80); do [ "$(held)" -eq 0 ] && break; sleep 0.5; done
sleep 1
grep -a "reaped the connections" "$DIR/b.log" | tail -1
kill "${BENCH[@]}" "$BPID" 2>/dev/null
sleep 1
kill "${RPIDS[@]}" 2>/dev/null
wait 2>/dev/null
rm -rf "$DIR"
