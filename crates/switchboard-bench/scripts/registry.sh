#!/usr/bin/env bash
# Restore and reaping at scale, cluster mode: one instance holds N
# connections; Redis is flushed (the instance reconciles them back), then
# the instance is SIGKILLed (a second instance reaps them). Prints the two
# log lines with the times. Needs the release build of both binaries:
#   cargo build --release --workspace
#   crates/switchboard-bench/scripts/registry.sh [connections-per-bench-process] [processes]
# Default 2 x 9750 = 19,500 connections (a process may open 20,000 files here).
# Uses a private redis-server on port 16390 and ports 18101/18102; stops
# everything it started by PID.
set -u
PER=${1:-9750}
PROCS=${2:-2}
TOTAL=$((PER * PROCS))
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
B=$ROOT/target/release
DIR=$(mktemp -d)
redis-server --port 16390 --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
RPID=$!
sleep 0.5
export SWITCHBOARD__BROKER__KIND=redis SWITCHBOARD__REDIS__URL=redis://127.0.0.1:16390 SWITCHBOARD__REDIS__PREFIX=m RUST_LOG=info
SWITCHBOARD__SERVER__PORT=18101 "$B/switchboard" serve --config "$ROOT/config/bench.toml" >/dev/null 2>"$DIR/a.log" &
APID=$!
SWITCHBOARD__SERVER__PORT=18102 "$B/switchboard" serve --config "$ROOT/config/bench.toml" >/dev/null 2>"$DIR/b.log" &
BPID=$!
sleep 1
BENCH=()
for _ in $(seq 1 "$PROCS"); do
  "$B/switchboard-bench" connections --url ws://127.0.0.1:18101 --count "$PER" --concurrency 200 --hold-s 60 >/dev/null 2>&1 &
  BENCH+=($!)
done
hlen() { redis-cli -p 16390 HLEN m:connections; }
for _ in $(seq 1 120); do [ "$(hlen)" -ge "$TOTAL" ] && break; sleep 0.5; done
echo "registered: $(hlen) of $TOTAL"
redis-cli -p 16390 FLUSHALL >/dev/null
for _ in $(seq 1 60); do [ "$(hlen)" -ge "$TOTAL" ] && break; sleep 0.5; done
sleep 1
grep -a "registry reconciled" "$DIR/a.log" | tail -1
kill -KILL "$APID"
for _ in $(seq 1 80); do [ "$(hlen)" -eq 0 ] && break; sleep 0.5; done
grep -a "reaped the connections" "$DIR/b.log" | tail -1
kill "${BENCH[@]}" "$BPID" 2>/dev/null
sleep 1
kill "$RPID" 2>/dev/null
wait 2>/dev/null
