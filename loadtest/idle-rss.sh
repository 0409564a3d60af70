#!/usr/bin/env bash
# Opens N idle connections (default 10,000) to one freshly started release node on loopback and
# prints the node's resident memory per connection. Stops the node it started, by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-10000}
port=${PORT:-18080}
internal=${INTERNAL_PORT:-19090}

cargo build --release --quiet -p switchboard -p switchboard-loadtest
target/release/switchboard --listen "127.0.0.1:$port" --internal-listen "127.0.0.1:$internal" \
  --max-connections $((connections + 100)) --log warn &
node=$!
trap 'kill "$node" 2>/dev/null; wait "$node" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$internal/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
target/release/switchboard-loadtest connect --url "ws://127.0.0.1:$port/ws" \
  --connections "$connections" --rate 5000 --hold-secs 5 --pid "$node"
