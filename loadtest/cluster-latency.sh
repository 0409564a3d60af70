#!/usr/bin/env bash
# Cross-node delivery latency and Redis commands per published message, on loopback: one
# redis-server and two release nodes sharing it; publishers on node A, subscribers on node B.
# Runs two cases, each: subscribe, 10 s idle (the Redis baseline), 2 s warm-up, 10 s measured:
#   small rooms: 100 rooms x 5 subscribers, 1000 msgs/s in total
#   one big room: 1 room x 1000 subscribers, 200 msgs/s
# Prints each result as JSON (also kept in $OUT, default target/cluster-latency/), with the CPU
# each process used over the measured window, and stops everything it started, by pid.
# Everything shares this machine's cores: the load generator competes with the nodes and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/cluster-latency}
duration=${DURATION_SECS:-10}
warmup=${WARMUP_SECS:-2}
mkdir -p "$out"
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
# Extra flags for both nodes go in NODE_FLAGS, e.g. NODE_FLAGS="--node-ttl-ms 60000".
start_cluster "$out/cluster"
pid_of() { cut -d' ' -f1 "$cluster_dir/pids/$1.pid"; }
redis_url=$REDIS
a_pid=$(pid_of node1) b_pid=$(pid_of node2) redis_pid=$(pid_of redis0)

run_case() { # name rooms subscribers-per-room rate
  echo "== $1: $2 rooms x $3 subscribers, $4 msgs/s, publish on A, subscribe on B" >&2
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2
  target/release/switchboard-loadtest latency \
    --publish-url "$NODE1_WS_URL" --subscribe-url "$NODE2_WS_URL" \
    --rooms "$2" --subscribers-per-room "$3" --rate "$4" \
    --duration-secs "$duration" --warmup-secs "$warmup" \
    --redis-url "$redis_url" --json "$out/$1.json" \
    --cpu-pid "node-a=$a_pid" --cpu-pid "node-b=$b_pid" --cpu-pid "redis=$redis_pid"
}

run_case small-rooms 100 5 1000
run_case big-room 1 1000 200
echo "results: $out/small-rooms.json $out/big-room.json" >&2
# What the nodes logged (warnings and errors only), counted by message and operation.
summarize_logs "$cluster_dir"/logs/node1.log "$cluster_dir"/logs/node2.log
