#!/usr/bin/env bash
# Idle connections at scale on loopback, release builds. Two cases:
#   single:  one node with its default --max-connections (derived from its open-files limit)
#            holding $SINGLE_CONNECTIONS (default 19,000) idle connections;
#   cluster: redis-server and three nodes sharing it, $CLUSTER_CONNECTIONS (default 50,000)
#            connections spread round-robin over the nodes, opened by $WORKERS (default 3) worker
#            processes of the harness, each from its own 127.0.0.x source addresses.
# Each case: the harness opens the connections at $RATE per second (default 4,000), waits until
# every worker has all of its own open, holds them $HOLD_SECS (default 10), and reads every
# server's RSS and the connections it holds before and at the end of the hold. While they are held, this
# script also reads each node's own switchboard_connections gauge.
# After the harness closes the connections (all at once), it prints what the nodes logged and,
# for the cluster, how many session registry entries were left in Redis.
# Usage: loadtest/scale.sh [single|cluster|all]   (default: all)
# Results (the harness's JSON and HTML) and server logs go to $OUT (default target/scale). Prints
# the kernel and file limits that bound the run first. Stops everything it started, by pid.
# Everything shares this machine's cores: the generator competes with the nodes (memory figures
# are not affected by that; handshake times are).
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-all}
out=${OUT:-target/scale}
single_connections=${SINGLE_CONNECTIONS:-19000}
cluster_connections=${CLUSTER_CONNECTIONS:-50000}
workers=${WORKERS:-3}
rate=${RATE:-4000}
hold=${HOLD_SECS:-10}
case "$cases" in single | cluster | all) ;; *) echo "usage: $0 [single|cluster|all]" >&2; exit 2 ;; esac
mkdir -p "$out"
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }

# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
trap stop_all EXIT

echo "== limits: open files (this shell) soft $(ulimit -Sn) hard $(ulimit -Hn)," \
  "somaxconn $(cat /proc/sys/net/core/somaxconn)," \
  "tcp_max_syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)," \
  "ephemeral ports $(tr '\t' - </proc/sys/net/ipv4/ip_local_port_range)," \
  "fs.file-max $(cat /proc/sys/fs/file-max)," \
  "conntrack max $(cat /proc/sys/net/netfilter/nf_conntrack_max 2>/dev/null || echo n/a)" >&2

cargo build --release --quiet -p switchboard -p switchboard-loadtest

node_urls=() node_pids=() node_internals=() node_logs=()
start_node() { # name [flags...]
  local name=$1 port internal
  shift
  port=$(free_port) internal=$(free_port)
  target/release/switchboard --node-id "$name" --listen "127.0.0.1:$port" \
    --internal-listen "127.0.0.1:$internal" --log warn --log-format json "${admission_off[@]}" "$@" \
    >"$out/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_ready "127.0.0.1:$internal" || { echo "$name never became ready" >&2; return 1; }
  node_urls+=("ws://127.0.0.1:$port/ws") node_pids+=("$pid") node_internals+=("$internal")
  node_logs+=("$out/$name.log")
  echo "$name: pid $pid, $(grep 'Max open files' "/proc/$pid/limits" | tr -s ' ')" >&2
}

# Runs the harness over every started node; prints each node's own connection gauge during the
# hold. Arguments: case name, connections, workers, then extra harness flags.
run_connect() {
  local name=$1 connections=$2 case_workers=$3 i url_args=() pid_args=()
  shift 3
  for i in "${!node_urls[@]}"; do
    url_args+=(--url "${node_urls[i]}")
    pid_args+=(--pid "node-$i=${node_pids[i]}")
  done
  echo "== $name: $connections connections over ${#node_urls[@]} node(s), $case_workers worker(s)," \
    "$rate/s, hold ${hold}s; load average $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2
  target/release/switchboard-loadtest connect "${url_args[@]}" "${pid_args[@]}" "$@" \
    --connections "$connections" --workers "$case_workers" --rate "$rate" --hold-secs "$hold" \
    --json "$out/$name.json" --html "$out/$name.html" >/dev/null 2>"$out/$name-harness.log" &
  local harness=$!
  pids+=("$harness")
  # The gauges, once every worker holds its connections.
  until grep -q "every worker holding" "$out/$name-harness.log"; do
    kill -0 "$harness" 2>/dev/null || break
    sleep 0.2
  done
  for i in "${!node_internals[@]}"; do
    echo "node-$i: $(curl -fsS "http://127.0.0.1:${node_internals[i]}/metrics" |
      grep '^switchboard_connections ' || echo 'no gauge')" >&2
  done
  local status=0
  wait "$harness" || status=$?
  cat "$out/$name-harness.log" >&2
  [ "$status" -eq 0 ] || { echo "$name: the harness failed ($status)" >&2; return "$status"; }
  python3 - "$out/$name.json" <<'PY' >&2
import json, sys
r = json.load(open(sys.argv[1]))
print(f"open {r['connections_open']} of {r['connections_requested']} in {r['open_secs']} s, "
      f"failures {r['failures']}, dropped {r['dropped_before_hold']} + {r['dropped_during_hold']}, "
      f"held {r['connections_held']}; handshake ms p50 {r['handshake_ms_p50']} "
      f"p99 {r['handshake_ms_p99']} p99.9 {r['handshake_ms_p999']} max {r['handshake_ms_max']}")
for s in r["servers"]:
    per = s["rss_per_connection_bytes"]
    print(f"  {s['name']}: RSS {s['rss_before_bytes'] / 2**20:.1f} -> {s['rss_after_bytes'] / 2**20:.1f} MiB, "
          f"sockets {s['sockets_before']} -> {s['sockets_after']}, "
          f"{'-' if per is None else f'{per / 1024:.2f} KiB'} per connection")
per = r["server_rss_per_connection_bytes"]
print(f"  total: {'-' if per is None else f'{per / 1024:.2f} KiB'} per connection held")
PY
}

# Once every node's gauge is back to 0 (at most 60 s after the harness closed everything): what
# the nodes logged, counted by message and operation, and (with Redis) the session registry
# entries left behind, which should be none, then and up to 60 s later.
after_close() {
  local i deadline=$((SECONDS + 60)) open
  for i in "${!node_internals[@]}"; do
    while :; do
      open=$(curl -fsS "http://127.0.0.1:${node_internals[i]}/metrics" |
        awk '$1 == "switchboard_connections" {print $2}')
      [ "${open:-0}" = 0 ] && break
      [ "$SECONDS" -lt "$deadline" ] || { echo "node-$i still counts $open connections" >&2; break; }
      sleep 0.2
    done
  done
  if [ -n "${redis_port:-}" ]; then
    # The nodes retry failed removals in the background: watch the count for up to 60 s.
    local left start=$SECONDS
    left=$(redis-cli -p "$redis_port" --scan --pattern 'sb:u:*' | wc -l)
    echo "session registry keys (sb:u:*) in Redis once every node counts 0 connections: $left" >&2
    while [ "$left" -gt 0 ] && [ $((SECONDS - start)) -lt 60 ]; do
      sleep 1
      left=$(redis-cli -p "$redis_port" --scan --pattern 'sb:u:*' | wc -l)
    done
    echo "... and $((SECONDS - start)) s later: $left" >&2
  fi
  summarize_logs "${node_logs[@]}"
}

if [ "$cases" = single ] || [ "$cases" = all ]; then
  node_urls=() node_pids=() node_internals=() node_logs=()
  start_node scale-single
  # Two workers keep each well inside its own open-files limit.
  run_connect single "$single_connections" 2
  after_close
  stop_all
fi

if [ "$cases" = cluster ] || [ "$cases" = all ]; then
  node_urls=() node_pids=() node_internals=() node_logs=()
  start_redis "$out/redis.log"
  for name in scale-a scale-b scale-c; do
    start_node "$name" --redis "$redis_url"
  done
  run_connect cluster "$cluster_connections" "$workers" --pid "redis=$redis_pid"
  after_close
  stop_all
fi
echo "results: $out/*.json, $out/*.html" >&2
