#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30), one after the other, and fails on the
# first crash, leak or timeout (libFuzzer writes the input to fuzz/artifacts/<target>/). Needs the
# nightly toolchain (cargo-fuzz builds with sanitizer flags); installs cargo-fuzz when missing.
#   fuzz/run.sh [SECONDS] [TARGET...]
# Each target's corpus grows in fuzz/target/corpus/<target>/, seeded from fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(json_frame msgpack_frame deflate_frame envelope handshake)
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: the nightly Rust toolchain is required (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

# No sanitizer: the code under test forbids unsafe, so AddressSanitizer would only slow it down;
# debug assertions on, so an arithmetic overflow is a crash too.
flags=(--sanitizer none --debug-assertions)
cargo +nightly fuzz build "${flags[@]}"
mkdir -p target/logs
for target in "${targets[@]}"; do
  mkdir -p "target/corpus/$target"
  echo "fuzz/run.sh: $target for ${seconds}s" >&2
  # libFuzzer prints a line per new input: its log goes to a file, and only the run's figures (or,
  # on a failure, the end of the log) to the terminal.
  log="target/logs/$target.log"
  if ! cargo +nightly fuzz run "${flags[@]}" "$target" "target/corpus/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz/run.sh: $target failed (log: fuzz/$log)" >&2
    exit 1
  fi
  executions=$(sed -n 's/^stat::number_of_executed_units: //p' "$log")
  echo "fuzz/run.sh: $target: ${executions:-?} executions in ${seconds}s, no crash" >&2
done
