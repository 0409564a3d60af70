#!/usr/bin/env bash
# Opens N idle connections (default 10,000) to one freshly started release node on loopback and
# prints the node's resident memory per connection. The second argument is the transport:
# websocket (the default), sse or poll (idle fallback sessions: an open event stream, a pending
# poll). Stops the node it started, by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-10000}
transport=${2:-websocket}
case "$transport" in
  websocket | sse | poll) ;;
  *) echo "idle-rss.sh: the transport is websocket, sse or poll, not $transport" >&2; exit 2 ;;
esac
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
# A long-poll session holds a place under --max-connections and its pending poll another.
places=$((connections + 100))
if [ "$transport" = poll ]; then places=$((2 * connections + 100)); fi
port=$(free_port)
internal=$(free_port)

cargo build --release --quiet -p switchboard -p switchboard-loadtest
target/release/switchboard --listen "127.0.0.1:$port" --internal-listen "127.0.0.1:$internal" \
  --max-connections "$places" --log warn "${admission_off[@]}" &
node=$!
pids+=("$node")
trap stop_all EXIT
wait_ready "127.0.0.1:$internal" || { echo "idle-rss.sh: the node never became ready" >&2; exit 1; }
# One worker process per 10,000 connections keeps each well inside its open-files limit.
target/release/switchboard-loadtest connect --transport "$transport" --url "ws://127.0.0.1:$port/ws" \
  --connections "$connections" --workers $(((connections + 9999) / 10000)) --rate 5000 \
  --hold-secs 5 --pid "node=$node"
