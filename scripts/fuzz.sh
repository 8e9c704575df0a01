#!/usr/bin/env bash
# Fuzzes riskd with cargo fuzz (nightly), each target SECONDS long (default 600):
#   decode     any bytes through riskd's decoder and serde_json: the same verdict
#              (an object, JSON but not an object, not JSON), the same value at
#              every path, the same event time (fuzz/fuzz_targets/decode.rs);
#   rule_file  any bytes as a rule file through the config loader: loaded or
#              refused with located errors, never a panic (fuzz/fuzz_targets/rule_file.rs).
# The corpus grows in fuzz/corpus/<target>; a failing input is kept in
# fuzz/artifacts/<target>. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode rule_file)
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
for t in "${targets[@]}"; do
  case $t in
    decode) max_len=4096 ;;
    *) max_len=8192 ;;
  esac
  cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -max_len="$max_len"
done
