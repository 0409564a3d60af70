#!/usr/bin/env bash
# Autobahn|Testsuite's fuzzingclient against the node's WebSocket layer (the echo fixture
# crates/switchboard/examples/autobahn_echo.rs, built on the node's configuration and read-error
# handling). Every case must end OK, NON-STRICT or INFORMATIONAL; prints the count per behaviour
# and fails otherwise. Cases 12.* and 13.* (permessage-deflate) are excluded: the node does not
# negotiate compression. The report is written to target/autobahn/report/ (index.html).
# Needs Python 2.7 (autobahntestsuite runs on nothing newer): taken from pyenv, else from PATH;
# installs autobahntestsuite into a virtualenv under target/tools/autobahn.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"

python=""
if command -v pyenv >/dev/null 2>&1; then
  version="$(pyenv versions --bare 2>/dev/null | grep -E '^2\.7(\.[0-9]+)?$' | tail -n 1 || true)"
  if [ -n "$version" ]; then
    python="$(pyenv root)/versions/$version/bin/python2.7"
  fi
fi
if [ -z "$python" ] && command -v python2.7 >/dev/null 2>&1 && python2.7 --version >/dev/null 2>&1; then
  python="$(command -v python2.7)"
fi
if [ -z "$python" ] || [ ! -x "$python" ]; then
  echo "tests/autobahn/run.sh: Python 2.7 is required for autobahntestsuite and was not found" \
    "(pyenv install 2.7.18, or a python2.7 on PATH)" >&2
  exit 1
fi

tools="$root/target/tools/autobahn"
if [ ! -x "$tools/venv/bin/wstest" ]; then
  echo "tests/autobahn/run.sh: installing autobahntestsuite into $tools/venv" >&2
  rm -rf "$tools"
  "$python" -m pip install -q --disable-pip-version-check --target "$tools/bootstrap" "virtualenv==20.15.1"
  PYTHONPATH="$tools/bootstrap" "$python" -m virtualenv -q "$tools/venv"
  "$tools/venv/bin/pip" install -q --disable-pip-version-check -r tests/autobahn/requirements.txt
fi

cargo build -q -p switchboard --example autobahn_echo
out="$root/target/autobahn"
rm -rf "$out"
mkdir -p "$out"
# Autobahn's 9.* cases send messages of up to 16 MiB: the fixture allows them (the node's default
# limit is 1 MiB; closing with 1009 over the limit is tested end to end in tests/e2e), with a
# queue limit well above it.
target/debug/examples/autobahn_echo 127.0.0.1:0 --max-message-size 16777216 \
  --max-queue-bytes 268435456 >"$out/fixture.log" 2>&1 &
fixture=$!
trap 'kill "$fixture" 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 1 600); do
  addr="$(sed -n 's/^autobahn_echo listening on //p' "$out/fixture.log")"
  [ -n "$addr" ] && break
  kill -0 "$fixture" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "tests/autobahn/run.sh: the echo fixture did not start:" >&2
  cat "$out/fixture.log" >&2
  exit 1
fi

cat >"$out/fuzzingclient.json" <<JSON
{
  "outdir": "$out/report",
  "servers": [{"agent": "switchboard", "url": "ws://$addr"}],
  "cases": ["*"],
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
JSON
echo "tests/autobahn/run.sh: fuzzingclient against ws://$addr (report in $out/report)" >&2
(cd "$out" && timeout 1800 "$tools/venv/bin/wstest" -m fuzzingclient -s fuzzingclient.json \
  >"$out/wstest.log" 2>&1) || {
  echo "tests/autobahn/run.sh: wstest failed (log: $out/wstest.log):" >&2
  tail -n 20 "$out/wstest.log" >&2
  exit 1
}

python3 - "$out/report/index.json" <<'PY'
import collections, json, sys

with open(sys.argv[1]) as file:
    cases = json.load(file)["switchboard"]
passing = {"OK", "NON-STRICT", "INFORMATIONAL"}
counts = collections.Counter()
failed = []
for case, result in sorted(cases.items(), key=lambda item: [int(n) for n in item[0].split(".")]):
    counts[result["behavior"]] += 1
    if result["behavior"] not in passing or result["behaviorClose"] not in passing:
        failed.append(f"{case}: {result['behavior']} (close: {result['behaviorClose']})")
print(f"Autobahn|Testsuite: {len(cases)} cases (12.* and 13.* excluded): "
      + ", ".join(f"{behavior} {count}" for behavior, count in sorted(counts.items())))
if failed:
    print("failing cases:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)
PY
