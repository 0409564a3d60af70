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
# Extra flags for both nodes, e.g. NODE_FLAGS="--node-ttl-ms 60000".
read -r -a node_flags <<<"${NODE_FLAGS:-}"
mkdir -p "$out"

command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }

# A TCP port nobody listens on right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
# Stops what this script started, newest first (the nodes before their Redis), each by its pid.
cleanup() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT

cargo build --release --quiet -p switchboard -p switchboard-loadtest

redis_port=$(free_port)
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
  --loglevel warning >"$out/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
for _ in $(seq 100); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis_url="redis://127.0.0.1:$redis_port"

start_node() { # name public-port internal-port
  target/release/switchboard --node-id "$1" --redis "$redis_url" --rate-limit 0 \
    --listen "127.0.0.1:$2" --internal-listen "127.0.0.1:$3" --drain-grace-ms 1000 \
    --log warn --log-format json ${node_flags[@]+"${node_flags[@]}"} >"$out/$1.log" 2>&1 &
  last_pid=$!
  pids+=("$last_pid")
}
wait_ready() { # internal-port
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "node on internal port $1 never became ready" >&2
  return 1
}

a_port=$(free_port) a_internal=$(free_port)
b_port=$(free_port) b_internal=$(free_port)
start_node bench-a "$a_port" "$a_internal"
a_pid=$last_pid
start_node bench-b "$b_port" "$b_internal"
b_pid=$last_pid
wait_ready "$a_internal"
wait_ready "$b_internal"

run_case() { # name rooms subscribers-per-room rate
  echo "== $1: $2 rooms x $3 subscribers, $4 msgs/s, publish on A, subscribe on B" >&2
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2
  target/release/switchboard-loadtest latency \
    --publish-url "ws://127.0.0.1:$a_port/ws" --subscribe-url "ws://127.0.0.1:$b_port/ws" \
    --rooms "$2" --subscribers-per-room "$3" --rate "$4" \
    --duration-secs "$duration" --warmup-secs "$warmup" \
    --redis-url "$redis_url" --json "$out/$1.json" \
    --cpu-pid "node-a=$a_pid" --cpu-pid "node-b=$b_pid" --cpu-pid "redis=$redis_pid"
}

run_case small-rooms 100 5 1000
run_case big-room 1 1000 200
echo "results: $out/small-rooms.json $out/big-room.json" >&2
# What the nodes logged (warnings and errors only), counted by message.
python3 - "$out"/bench-a.log "$out"/bench-b.log <<'PY' >&2
import collections, json, sys
for path in sys.argv[1:]:
    counts = collections.Counter()
    for line in open(path):
        try:
            event = json.loads(line)
        except ValueError:
            counts[line.strip()[:120]] += 1
            continue
        counts[f"{event.get('level')} {event.get('fields', {}).get('message')}"] += 1
    for message, count in counts.most_common():
        print(f"{path}: {count} x {message}")
PY
