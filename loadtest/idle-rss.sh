#!/usr/bin/env bash
# Opens N idle connections (default 10,000) to one freshly started release node on loopback and
# prints the node's resident memory per connection. The second argument is the transport:
# websocket (the default), sse or poll (idle fallback sessions: an open event stream, a pending
# poll). The third is how many rooms each connection subscribes to before it is held (default 0;
# connection I takes rooms idle-((I + J) mod 1000), so rooms are shared). Stops the node it
# started, by pid. With HEAPTRACK_OUT=FILE set, the node runs under heaptrack, which writes
# its heap profile to FILE.zst (FILE.gz without zstd; read it with heaptrack_print). With
# NODE_BIN=PATH the node is that binary instead of this tree's release build (to compare two
# builds in one session, alternately). Extra node flags go in NODE_ARGS (split on spaces).
# The fourth argument (or IDLE_RSS_CODEC) is the WebSocket codec: json (the default), msgpack or
# json+deflate.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-10000}
transport=${2:-websocket}
subscribe=${3:-0}
codec=${4:-${IDLE_RSS_CODEC:-json}}
case "$transport" in
  websocket | sse | poll) ;;
  *) echo "idle-rss.sh: the transport is websocket, sse or poll, not $transport" >&2; exit 2 ;;
esac
case "$codec" in
  json | msgpack | json+deflate) ;;
  *) echo "idle-rss.sh: the codec is json, msgpack or json+deflate, not $codec" >&2; exit 2 ;;
esac
case "$subscribe" in
  '' | *[!0-9]*) echo "idle-rss.sh: the subscriptions per connection are a number, not $subscribe" >&2; exit 2 ;;
esac
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
# A long-poll session holds a place under --max-connections and its pending poll another.
places=$((connections + 100))
if [ "$transport" = poll ]; then places=$((2 * connections + 100)); fi
port=$(free_port)
internal=$(free_port)

cargo build --release --quiet -p switchboard -p switchboard-loadtest
read -r -a extra_args <<<"${NODE_ARGS:-}"
node_command=("${NODE_BIN:-target/release/switchboard}" --listen "127.0.0.1:$port" --internal-listen "127.0.0.1:$internal"
  --max-connections "$places" --log warn "${admission_off[@]}" "${extra_args[@]}")
trap stop_all EXIT
if [ -n "${HEAPTRACK_OUT:-}" ]; then
  # Heap profile: the node runs under heaptrack (its RSS then includes heaptrack's own); the
  # profile is written to $HEAPTRACK_OUT.zst once the node has stopped.
  heaptrack --output "$HEAPTRACK_OUT" "${node_command[@]}" >&2 &
  tracker=$!
  pids+=("$tracker")
  node=
  for _ in $(seq 100); do
    # The node's process name is its file's name, cut to the kernel's 15 characters.
    node=$(pgrep -P "$tracker" -x "$(basename "${node_command[0]}" | cut -c1-15)" || true)
    [ -n "$node" ] && break
    sleep 0.1
  done
  [ -n "$node" ] || { echo "idle-rss.sh: heaptrack never started the node" >&2; exit 1; }
else
  "${node_command[@]}" &
  node=$!
fi
pids+=("$node")
wait_ready "127.0.0.1:$internal" || { echo "idle-rss.sh: the node never became ready" >&2; exit 1; }
# One worker process per 10,000 connections keeps each well inside its open-files limit.
target/release/switchboard-loadtest connect --transport "$transport" --codec "$codec" --url "ws://127.0.0.1:$port/ws" \
  --connections "$connections" --workers $(((connections + 9999) / 10000)) --rate 5000 \
  --hold-secs 5 --subscribe "$subscribe" --pid "node=$node"
if [ -n "${HEAPTRACK_OUT:-}" ]; then
  # The node first, then heaptrack finishes writing the profile.
  kill "$node"
  wait "$tracker" || true
  pids=()
fi
