#!/usr/bin/env bash
# riskd's benchmarks (figures in BENCHMARKS.md):
#   scripts/bench.sh throughput   main job vs parse-only, embedded store (1 M events)
#   scripts/bench.sh dynamodb     DynamoDB requests per 1,000 events and events/s, on DynamoDB Local
#   scripts/bench.sh kafka        events/s from a broker through the rules to the alerts topic, vs a bare consume
#   scripts/bench.sh              all three
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
what=${1:-all}

if [ "$what" = throughput ] || [ "$what" = all ]; then
  cargo bench --bench throughput
fi
# shellcheck source=scripts/services.sh
. "$root/scripts/services.sh"

if [ "$what" = dynamodb ] || [ "$what" = all ]; then
  install_ddb
  start_ddb
  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
  cargo bench --bench dynamodb
fi
if [ "$what" = kafka ] || [ "$what" = all ]; then
  install_tansu
  start_tansu
  cargo bench --bench kafka
fi
