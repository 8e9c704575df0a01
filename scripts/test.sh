#!/usr/bin/env bash
# riskd's whole test suite, from a fresh clone: lints, then every unit and
# integration test. Services the tests need are installed under .services/
# and started here (none yet: the embedded store needs none).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "scripts/test.sh: cargo not found; install Rust (rustup)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked
