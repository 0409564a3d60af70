# shellcheck shell=bash
# Shell functions the load-test scripts (bench.sh, scale.sh, cluster-latency.sh, idle-rss.sh,
# persist-cost.sh) share; sourced, not run. Messages name the script that sourced this file.

# A loopback TCP port nobody listens on right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Node flags that turn the admission limits off: the generator opens thousands of connections from
# a few loopback addresses at a held rate, which the per-address limits and the accept rate (meant
# for the open internet) would refuse or pace; the runs measure the node, not those limits.
# shellcheck disable=SC2034 # used by the scripts that source this file
admission_off=(--max-connections-per-ip 0 --connect-rate-per-ip 0 --accept-rate 0)

# The pids of what the script started, oldest first.
pids=()
# Stops what the script started, newest first (servers before their Redis), each by its pid.
stop_all() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  pids=()
}

# Waits (at most 20 s) until FILE has a line matching REGEX and prints its first match; fails if
# process PID exits first.
wait_match() { # file regex pid
  local match
  for _ in $(seq 200); do
    match=$(grep -o -m1 -E "$2" "$1" 2>/dev/null || true)
    if [ -n "$match" ]; then
      echo "$match"
      return 0
    fi
    kill -0 "$3" 2>/dev/null || break
    sleep 0.1
  done
  echo "${0##*/}: no '$2' in $1:" >&2
  tail -n 20 "$1" >&2
  return 1
}

# Waits (at most 10 s) until the node whose internal listener is at HOST:PORT is ready.
wait_ready() { # host:port
  for _ in $(seq 100); do
    curl -fsS "http://$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# Starts a redis-server on a free port, logging to LOG; sets redis_pid, redis_port and redis_url.
start_redis() { # log
  redis_port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --loglevel warning >"$1" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  for _ in $(seq 100); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$redis_port" ping >/dev/null || { echo "${0##*/}: redis-server did not start" >&2; return 1; }
  # shellcheck disable=SC2034 # for the caller
  redis_url="redis://127.0.0.1:$redis_port"
}

# Prints what each node logged (JSON lines, --log-format json), counted by level, message and
# operation (`op`, where there is one), most frequent first.
summarize_logs() { # log...
  python3 - "$@" <<'PY' >&2
import collections, json, sys
for path in sys.argv[1:]:
    counts = collections.Counter()
    for line in open(path):
        try:
            event = json.loads(line)
        except ValueError:
            counts[line.strip()[:120]] += 1
            continue
        fields = event.get("fields", {})
        counts[f"{event.get('level')} {fields.get('message')} {fields.get('op', '')}".strip()] += 1
    for message, count in counts.most_common():
        print(f"{path}: {count} x {message}")
PY
}

# Builds the release binaries and starts deploy/local/cluster.sh's cluster (one Redis, two nodes,
# HAProxy unused) in DIR, so the benchmarks run what operators run locally. The nodes get the
# script's benchmark flags, NODE_FLAGS and admission_off. `down` stops exactly what `up` started:
# first what an earlier run left in DIR, then, on exit, this cluster. Sets cluster_dir and sources
# its cluster.env (NODE1_WS_URL, NODE2_WS_URL, REDIS, ...).
start_cluster() { # dir
  cluster_dir=$1
  local node_flags="--rate-limit 0 --drain-grace-ms 1000 ${NODE_FLAGS:-} ${admission_off[*]}"
  cargo build --release --quiet -p switchboard -p switchboard-loadtest
  deploy/local/cluster.sh down --dir "$cluster_dir" >/dev/null 2>&1 || true
  trap 'deploy/local/cluster.sh down --dir "$cluster_dir" >&2' EXIT
  NODE_FLAGS="$node_flags" deploy/local/cluster.sh up --release --nodes 2 --shards 1 \
    --dir "$cluster_dir" >&2
  # shellcheck source=/dev/null
  source "$cluster_dir/cluster.env"
}
