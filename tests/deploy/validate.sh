#!/usr/bin/env bash
# Offline validation of deploy/ and k8s/ (see tests/deploy/validate.py for what is checked), and
# runs of the Kubernetes HAProxy config, of every deployment's node settings and of the Compose
# monitoring against real processes (tests/deploy/*_test.py).
# Installs what it needs when missing: PyYAML, kubernetes-validate, dnslib, websockets and PyJWT
# (PyPI, pinned), promtool and prometheus (Debian's prometheus package), haproxy and pip (apt).
# kubectl (for `kubectl kustomize`) must be installed, or installable with apt from a configured
# Kubernetes or Google Cloud repository.
set -euo pipefail
cd "$(dirname "$0")/../.."

KUBERNETES_VALIDATE_VERSION=1.34.1
DNSLIB_VERSION=0.9.26
WEBSOCKETS_VERSION=15.0.1
PYJWT_VERSION=2.10.1

if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
apt_install() {
  echo "tests/deploy/validate.sh: installing $*" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

version_of() {
  python3 -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true
}
if ! python3 -c 'import yaml' 2>/dev/null \
  || [ "$(version_of kubernetes-validate)" != "$KUBERNETES_VALIDATE_VERSION" ] \
  || [ "$(version_of dnslib)" != "$DNSLIB_VERSION" ] \
  || [ "$(version_of websockets)" != "$WEBSOCKETS_VERSION" ] \
  || [ "$(version_of PyJWT)" != "$PYJWT_VERSION" ]; then
  pkgs=(PyYAML "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "dnslib==$DNSLIB_VERSION"
        "websockets==$WEBSOCKETS_VERSION" "PyJWT==$PYJWT_VERSION")
  echo "tests/deploy/validate.sh: installing ${pkgs[*]}" >&2
  # Debian's own python3 refuses pip installs outside a virtualenv (PEP 668) unless told.
  python3 -m pip install -q --disable-pip-version-check "${pkgs[@]}" 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "${pkgs[@]}"
fi

# The tests import tests/deploy/support.py: leave no __pycache__ in the tree.
export PYTHONDONTWRITEBYTECODE=1
status=0
python3 tests/deploy/validate.py || status=$?
# With the binary that `cargo build` puts in target/debug: the Kubernetes HAProxy config
# discovering real nodes through a test DNS server; the node settings of Compose and of each
# overlay (plus the image's health check) on a real node and redis-server; the Compose cluster's
# monitoring (nodes, HAProxy, Redis, Prometheus with the rules) as local processes.
python3 tests/deploy/haproxy_dns_test.py || status=$?
python3 tests/deploy/runtime_test.py || status=$?
python3 tests/deploy/monitoring_test.py || status=$?
exit "$status"
