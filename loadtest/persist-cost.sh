#!/usr/bin/env bash
# The cost of a persisted direct message beside a plain one, on loopback: one redis-server and two
# release nodes sharing it; 200 users (100 on each node), each sending to a partner on the other
# node. Runs, alternately and ROUNDS times (default 2), `direct` (plain), `direct --persist` with
# no ack during the run (the send alone) and `direct --persist` acknowledged every 10 messages or
# 100 ms (the send and its share of an ack), then `direct --persist --drop-after-secs` (a reconnect
# storm mid-run). Each run reads Redis INFO commandstats when sending starts and after the drain.
# Prints each result as JSON (also kept in $OUT, default target/persist-cost/) and a summary, and
# stops everything it started, by pid. Everything shares this machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v jq >/dev/null || { echo "persist-cost.sh: jq is needed for the summary (apt-get install jq)" >&2; exit 1; }
out=${OUT:-target/persist-cost}
duration=${DURATION_SECS:-10}
rate=${RATE:-1000}
users=${USERS:-200}
rounds=${ROUNDS:-2}
mkdir -p "$out"
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
start_cluster "$out/cluster"

run_case() { # name extra-flags...
  local name=$1
  shift
  echo "== $name: $users users, $rate msgs/s for ${duration}s, $*" >&2
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2
  target/release/switchboard-loadtest direct \
    --url "$NODE1_WS_URL" --url "$NODE2_WS_URL" --users "$users" --rate "$rate" \
    --duration-secs "$duration" --redis-url "$REDIS" --json "$out/$name.json" "$@" >/dev/null
}

for round in $(seq 1 "$rounds"); do
  run_case "plain-$round"
  run_case "unacked-$round" --persist --ack-every 1000000 --ack-interval-ms 60000
  run_case "persisted-$round" --persist
done
run_case storm --persist --drop-after-secs $((duration / 2))

summary='[.sent, .delivered, .lost, (.duplicates // 0), (.redelivered // "-"),
  (if .acks_sent then (.acks_sent / .sent * 1000 | round / 1000) else "-" end),
  .latency_ms_p50, .latency_ms_p99, .redis.commands_per_publish,
  .redis.script_calls_per_publish, (.redis.by_command_per_publish | tostring)] | @tsv'
echo -e "case\tsent\tdelivered\tlost\tdup\tredelivered\tacks/msg\tp50_ms\tp99_ms\tcmds/msg\tscripts/msg\tby_command"
for file in "$out"/plain-*.json "$out"/unacked-*.json "$out"/persisted-*.json "$out"/storm.json; do
  echo -e "$(basename "$file" .json)\t$(jq -r "$summary" "$file")"
done
summarize_logs "$cluster_dir"/logs/node1.log "$cluster_dir"/logs/node2.log
