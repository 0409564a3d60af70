#!/usr/bin/env bash
# Offline validation of deploy/ and k8s/ (see tests/deploy/validate.py for what is checked).
# Installs what it needs when missing: PyYAML and kubernetes-validate (PyPI, pinned), promtool
# (Debian's prometheus package) and haproxy (apt). kubectl (for `kubectl kustomize`) must be
# installed, or installable with apt from a configured Kubernetes or Google Cloud repository.
set -euo pipefail
cd "$(dirname "$0")/../.."

KUBERNETES_VALIDATE_VERSION=1.34.1

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
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

if ! python3 -c 'import yaml' 2>/dev/null \
  || [ "$(python3 -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  echo "tests/deploy/validate.sh: installing PyYAML and kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
  pkgs=(PyYAML "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
  # Debian's own python3 refuses pip installs outside a virtualenv (PEP 668) unless told.
  python3 -m pip install -q --disable-pip-version-check "${pkgs[@]}" 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "${pkgs[@]}"
fi

exec python3 tests/deploy/validate.py
