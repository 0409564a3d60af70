#!/usr/bin/env bash
# Side by side: switchboard, Socket.IO 4 (with its Redis adapter) and the raw tokio-tungstenite
# ceiling server, each started fresh on loopback under the same conditions, each driven by the same
# switchboard-loadtest scenarios, then one comparison table. See --help.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
Usage: loadtest/bench.sh [OPTIONS]

Starts each system in turn on 127.0.0.1 (ports chosen at run time), runs the same scenarios against
it, stops it, and finally prints one table (switchboard-loadtest compare):

  switchboard       a redis-server and N switchboard nodes (target/release/switchboard)
  switchboard-sse   the same, every session over SSE (`--transport sse`: GET /sse, POSTs)
  switchboard-poll  the same, every session over long poll (`--transport poll`)
  switchboard-msgpack, switchboard-deflate
                    the same, every session a WebSocket in the msgpack or json+deflate codec
                    (`--codec msgpack`, `--codec json+deflate`), in fanout and connect
  socketio          a redis-server and N Socket.IO peers (loadtest/peers/socketio, node)
  raw               one switchboard-raw-ceiling (no Redis; always a single process)

For every rate: a fresh system, then `fanout` (subscribers and publishers spread over the nodes;
CPU of every server process and of redis-server). Then a fresh system and `connect` against the
first node for resident memory per idle connection. Last, the table, also written with its charts
as one self-contained HTML page (DIR/compare.html).

Options:
  --nodes N             nodes for switchboard and Socket.IO [default: 1]
  --rooms R             rooms [default: 1]
  --subscribers S       subscriber connections in total, a multiple of R [default: 2000]
  --rates LIST          comma-separated publish rates, messages/s; one fanout run each [default: 50,200]
  --publishers P        publisher connections [default: 4]
  --duration-secs D     measured window of each fanout run [default: 10]
  --warmup-secs W       warm-up before each measured window [default: 2]
  --connections C       idle connections of the connect run; 0 skips it [default: 10000]
  --payload P           what each publish carries: stamp (~40 bytes), market (~1 KiB JSON
                        order-book update) or chat (~1 KiB JSON chat message) [default: stamp]
  --systems LIST        which systems, comma-separated [default: switchboard,socketio,raw]
  --out DIR             JSON results and server logs [default: target/bench]
  -h, --help            this text

Results (the harness's JSON; its stdout is not shown): DIR/SYSTEM-fanout-RATE.json, DIR/SYSTEM-connect.json,
DIR/compare.html; server logs DIR/*.log.
Everything (load generator included) shares this machine's cores.
EOF
}

nodes=1 rooms=1 subscribers=2000 rates=50,200 publishers=4 duration=10 warmup=2
connections=10000 systems=switchboard,socketio,raw out=target/bench payload=stamp
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --rooms) rooms=$2; shift 2 ;;
    --subscribers) subscribers=$2; shift 2 ;;
    --rates) rates=$2; shift 2 ;;
    --publishers) publishers=$2; shift 2 ;;
    --duration-secs) duration=$2; shift 2 ;;
    --warmup-secs) warmup=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --systems) systems=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --payload) payload=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for value in "$nodes" "$rooms" "$subscribers" "$publishers" "$duration" "$warmup" "$connections"; do
  [[ $value =~ ^[0-9]+$ ]] || { echo "bench.sh: not a number: $value" >&2; exit 2; }
done
[[ $rates =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "bench.sh: --rates must look like 50,200" >&2; exit 2; }
[ "$nodes" -ge 1 ] && [ "$rooms" -ge 1 ] || { echo "bench.sh: --nodes and --rooms must be at least 1" >&2; exit 2; }
case "$payload" in stamp | market | chat) ;; *) echo "bench.sh: --payload must be stamp, market or chat" >&2; exit 2 ;; esac
IFS=, read -r -a rate_list <<<"$rates"
IFS=, read -r -a system_list <<<"$systems"
for system in "${system_list[@]}"; do
  case "$system" in
    switchboard | switchboard-sse | switchboard-poll | switchboard-msgpack | switchboard-deflate | socketio | raw) ;;
    *) echo "bench.sh: unknown system $system" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
# Connections are files: every process started here inherits the hard limit.
ulimit -n "$(ulimit -Hn)"

loadtest=target/release/switchboard-loadtest
peer_dir=loadtest/peers/socketio

# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
trap stop_all EXIT
# So a SIGTERM (once the current run returns) or ctrl-c also goes through stop_all.
trap 'exit 143' TERM
trap 'exit 130' INT

# Starts SYSTEM fresh and sets urls (one per node), cpu_args (--cpu-pid NAME=PID for every server
# process and redis-server) and first_pid (the node `connect` measures).
start_system() { # system tag
  local i log addr internal pid
  urls=() cpu_args=()
  case "$1" in
    switchboard*)
      start_redis "$out/$2-redis.log"
      for ((i = 1; i <= nodes; i++)); do
        log="$out/$2-node$i.log"
        target/release/switchboard --node-id "node$i" --redis "$redis_url" --rate-limit 0 \
          --listen 127.0.0.1:0 --internal-listen 127.0.0.1:0 --drain-grace-ms 1000 \
          --log info --log-format json "${admission_off[@]}" >"$log" 2>&1 &
        pid=$!
        pids+=("$pid")
        addr=$(wait_match "$log" '"public":"[^"]*"' "$pid" | cut -d'"' -f4)
        internal=$(wait_match "$log" '"internal":"[^"]*"' "$pid" | cut -d'"' -f4)
        wait_ready "$internal" || { echo "bench.sh: node$i not ready" >&2; return 1; }
        urls+=("ws://$addr/ws")
        cpu_args+=(--cpu-pid "node$i=$pid")
        if [ "$i" -eq 1 ]; then first_pid=$pid; fi
      done
      cpu_args+=(--cpu-pid "redis=$redis_pid")
      ;;
    socketio)
      start_redis "$out/$2-redis.log"
      for ((i = 1; i <= nodes; i++)); do
        log="$out/$2-sio$i.log"
        PORT=0 REDIS_URL="$redis_url" node "$peer_dir/server.js" >"$log" 2>&1 &
        pid=$!
        pids+=("$pid")
        addr=$(wait_match "$log" '^listening on [0-9.:]+' "$pid" | cut -d' ' -f3)
        urls+=("ws://$addr/socket.io/?EIO=4&transport=websocket")
        cpu_args+=(--cpu-pid "sio$i=$pid")
        if [ "$i" -eq 1 ]; then first_pid=$pid; fi
      done
      # Each adapter's Redis subscriptions must be in place before anything is published.
      for ((i = 0; ; i++)); do
        [ "$(redis-cli -p "$redis_port" pubsub numsub 'socket.io-request#/#' | tail -n1)" = "$nodes" ] && break
        [ "$i" -lt 100 ] || { echo "bench.sh: the Socket.IO adapters never subscribed" >&2; return 1; }
        sleep 0.1
      done
      cpu_args+=(--cpu-pid "redis=$redis_pid")
      ;;
    raw)
      log="$out/$2-raw.log"
      target/release/switchboard-raw-ceiling --listen 127.0.0.1:0 >"$log" 2>&1 &
      pid=$!
      pids+=("$pid")
      addr=$(wait_match "$log" '^listening on [0-9.:]+' "$pid" | cut -d' ' -f3)
      urls=("ws://$addr/")
      cpu_args=(--cpu-pid "raw=$pid")
      first_pid=$pid
      ;;
  esac
}

# What a system speaks (--protocol) and over which transport (--transport).
protocol_of() { # system
  case "$1" in
    switchboard*) echo switchboard ;;
    *) echo "$1" ;;
  esac
}
transport_of() { # system
  case "$1" in
    switchboard-sse) echo sse ;;
    switchboard-poll) echo poll ;;
    *) echo websocket ;;
  esac
}
codec_of() { # system
  case "$1" in
    switchboard-msgpack) echo msgpack ;;
    switchboard-deflate) echo json+deflate ;;
    *) echo json ;;
  esac
}

cargo build --release --quiet -p switchboard -p switchboard-loadtest
command -v redis-server >/dev/null || { echo "bench.sh: redis-server is not installed" >&2; exit 1; }
if [[ ,$systems, == *,socketio,* ]]; then
  command -v node >/dev/null || { echo "bench.sh: node and npm are needed for socketio" >&2; exit 1; }
  [ -d "$peer_dir/node_modules" ] || (cd "$peer_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi

# Every run is bounded: the harness's own windows and timeouts, plus this margin for setup.
fanout_limit=$((warmup + duration + 5 + 60 + 60))
fanout_files=() connect_files=()
for system in "${system_list[@]}"; do
  for rate in "${rate_list[@]}"; do
    echo "== $system: fanout, $rooms room(s) x $((subscribers / rooms)) subscribers, $rate msgs/s" >&2
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2
    start_system "$system" "$system-fanout-$rate"
    url_args=()
    for url in "${urls[@]}"; do url_args+=(--url "$url"); done
    timeout --foreground --kill-after=10 "$fanout_limit" "$loadtest" fanout --protocol "$(protocol_of "$system")" \
      --transport "$(transport_of "$system")" --codec "$(codec_of "$system")" --payload "$payload" "${url_args[@]}" \
      --rooms "$rooms" --subscribers "$subscribers" --publishers "$publishers" --rate "$rate" \
      --duration-secs "$duration" --warmup-secs "$warmup" "${cpu_args[@]}" \
      --json "$out/$system-fanout-$rate.json" >/dev/null
    fanout_files+=("$out/$system-fanout-$rate.json")
    stop_all
  done
  if [ "$connections" -gt 0 ]; then
    echo "== $system: connect, $connections idle connections" >&2
    start_system "$system" "$system-connect"
    # One worker process per 10,000 connections keeps each within its open-files limit.
    workers=$(((connections + 9999) / 10000))
    timeout --foreground --kill-after=10 180 "$loadtest" connect --protocol "$(protocol_of "$system")" \
      --transport "$(transport_of "$system")" --codec "$(codec_of "$system")" --url "${urls[0]}" \
      --connections "$connections" --workers "$workers" --pid "$first_pid" --json "$out/$system-connect.json" >/dev/null
    connect_files+=(--connect "$out/$system-connect.json")
    stop_all
  fi
done

"$loadtest" compare --html "$out/compare.html" "${fanout_files[@]}" ${connect_files[@]+"${connect_files[@]}"}
echo "bench.sh: the table and its charts: $out/compare.html" >&2
