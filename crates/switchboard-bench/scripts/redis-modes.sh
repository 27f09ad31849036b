#!/usr/bin/env bash
# What each Redis setup costs a publish: two hubs, subscribers on one and
# publishers on the other (every delivery crosses Redis), the same fan-out
# on (1) one Redis, (2) one Redis with a replica and `redis.wait_replicas =
# 1` (an ack waits for the replica), (3) a Redis Cluster of three primaries
# (sharded pub/sub). For each: the fan-out's verdict with publish-ack and
# delivery latency at a fixed rate, then a sweep (RATES msg/s, 4 s a step,
# p99 <= MAX_P99_MS, default 100) whose last sustained step is the
# cross-instance throughput. Needs the release build of both binaries:
#   cargo build --release --workspace
#   crates/switchboard-bench/scripts/redis-modes.sh [subscribers] [msg/s] [seconds]
# Default 1,000 subscribers over 10 rooms, 10 publishers, 200 msg/s (20,000
# deliveries/s), 10 s. Uses private redis-servers on ports 16401-16405 and
# hubs on 18401/18402; stops everything it started by PID.
set -u
SUBS=${1:-1000}
RATE=${2:-200}
SECS=${3:-10}
RATES=${RATES:-1000,2000,4000,6000,8000,11000,15000}
MAX_P99_MS=${MAX_P99_MS:-100}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
B=$ROOT/target/release
DIR=$(mktemp -d)
PIDS=()
redis() { # port, extra args…
  local port=$1
  shift
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
    --dbfilename "dump-$port.rdb" "$@" >"$DIR/redis-$port.log" 2>&1 &
  PIDS+=($!)
}
redis 16401
redis 16402 --replicaof 127.0.0.1 16401
for p in 16403 16404 16405; do
  redis "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf"
done
sleep 1
redis-cli --cluster create 127.0.0.1:16403 127.0.0.1:16404 127.0.0.1:16405 --cluster-yes >/dev/null
for _ in $(seq 1 60); do
  redis-cli -p 16403 CLUSTER INFO | grep -q cluster_state:ok &&
    redis-cli -p 16402 INFO replication | grep -q master_link_status:up && break
  sleep 0.5
done
CLUSTER_URL=redis://127.0.0.1:16403,redis://127.0.0.1:16404,redis://127.0.0.1:16405

run() { # name, then SWITCHBOARD__ assignments
  local name=$1
  shift
  local hubs=() prefix="m$RANDOM"
  for port in 18401 18402; do
    env SWITCHBOARD__BROKER__KIND=redis SWITCHBOARD__REDIS__PREFIX="$prefix" "$@" \
      SWITCHBOARD__SERVER__PORT=$port "$B/switchboard" serve --config "$ROOT/config/bench.toml" \
      >/dev/null 2>"$DIR/$name-$port.log" &
    hubs+=($!)
  done
  sleep 1
  echo "== $name"
  "$B/switchboard-bench" fanout --url ws://127.0.0.1:18401 --publish-url ws://127.0.0.1:18402 \
    --subscribers "$SUBS" --publishers 10 --rooms 10 --rate "$RATE" --messages $((RATE * SECS)) \
    --api-key bench-key >"$DIR/$name.txt" 2>&1
  grep -E "^result|publish ack latency|latency \(publish|missing" "$DIR/$name.txt"
  "$B/switchboard-bench" fanout --url ws://127.0.0.1:18401 --publish-url ws://127.0.0.1:18402 \
    --subscribers "$SUBS" --publishers 10 --rooms 10 --rates "$RATES" --step-s 4 \
    --max-p99-ms "$MAX_P99_MS" --api-key bench-key >"$DIR/$name-sweep.txt" 2>&1
  grep -E "^=== step|^max sustained" "$DIR/$name-sweep.txt"
  kill "${hubs[@]}" 2>/dev/null
  wait "${hubs[@]}" 2>/dev/null
}
run standalone SWITCHBOARD__REDIS__URL=redis://127.0.0.1:16401
run "standalone, wait_replicas = 1" SWITCHBOARD__REDIS__URL=redis://127.0.0.1:16401 SWITCHBOARD__REDIS__WAIT_REPLICAS=1
run "cluster, 3 primaries" SWITCHBOARD__REDIS__MODE=cluster SWITCHBOARD__REDIS__URL=$CLUSTER_URL
kill "${PIDS[@]}" 2>/dev/null
wait 2>/dev/null
echo "outputs: $DIR"
