#!/usr/bin/env bash
# Opens N idle connections (default 10,000) to one freshly started release node on loopback and
# prints the node's resident memory per connection. Stops the node it started, by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-10000}
# Loopback ports nobody listens on right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
internal=$(free_port)

cargo build --release --quiet -p switchboard -p switchboard-loadtest
target/release/switchboard --listen "127.0.0.1:$port" --internal-listen "127.0.0.1:$internal" \
  --max-connections $((connections + 100)) --log warn &
node=$!
trap 'kill "$node" 2>/dev/null; wait "$node" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$internal/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
# One worker process per 10,000 connections keeps each well inside its open-files limit.
target/release/switchboard-loadtest connect --url "ws://127.0.0.1:$port/ws" \
  --connections "$connections" --workers $(((connections + 9999) / 10000)) --rate 5000 \
  --hold-secs 5 --pid "node=$node"
