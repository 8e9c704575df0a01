#!/usr/bin/env bash
# riskd's benchmarks (figures in BENCHMARKS.md):
#   scripts/bench.sh throughput   main job vs parse-only, embedded store (1 M events), every shipped rule and the five alone
#   scripts/bench.sh dynamodb     DynamoDB requests per 1,000 events and events/s, on DynamoDB Local
#   scripts/bench.sh kafka        events/s from a broker through the rules to the alerts topic, vs a bare consume
#   scripts/bench.sh order        the file job with the event-time buffer off and on (events/s, peak memory)
#   scripts/bench.sh cost         DynamoDB units and $ per 1,000 events fed live (1,000 and 10,000/s, 5 min
#                                 each, three store variants) beside Panther's helpers; long: not in `all`
#   scripts/bench.sh sigma        the file job with the five rules alone and with every vendored Sigma rule,
#                                 beside the rsigma engine (library and `rsigma engine eval`) on the same file
#   scripts/bench.sh entities     the leaderboard over 1,000,000 entities with risk (fill, list top 50, naive)
#   scripts/bench.sh              all six (not cost)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
what=${1:-all}

if [ "$what" = throughput ] || [ "$what" = all ]; then
  cargo bench --bench throughput
fi
if [ "$what" = entities ] || [ "$what" = all ]; then
  cargo bench --bench entities
fi
if [ "$what" = sigma ] || [ "$what" = all ]; then
  # The rsigma CLI, for the row beside `rsigma engine eval` (crates.io, once).
  if [ ! -x .services/rsigma/bin/rsigma ]; then
    echo "== installing the rsigma CLI 0.23.0 into .services/rsigma (a few minutes, once)"
    cargo install rsigma@0.23.0 --locked --root .services/rsigma
  fi
  cargo bench --bench sigma
fi
# shellcheck source=scripts/services.sh
. "$root/scripts/services.sh"

if [ "$what" = dynamodb ] || [ "$what" = all ]; then
  install_ddb
  start_ddb
  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
  cargo bench --bench dynamodb
fi
if [ "$what" = cost ]; then
  install_ddb
  start_ddb
  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
  if [ ! -x .services/panther/bin/python ]; then
    echo "== creating the Panther baseline's venv in .services/panther"
    python3 -m venv .services/panther && .services/panther/bin/pip install -q -r scripts/panther_baseline/requirements.txt
  fi
  cargo bench --bench cost
fi
if [ "$what" = kafka ] || [ "$what" = all ]; then
  install_tansu
  start_tansu
  cargo bench --bench kafka
fi
if [ "$what" = order ] || [ "$what" = all ]; then
  # Same run, alternating: event_time.max_delay 0s (off, the default), 5s
  # and 1m, 3 rounds, on the same generated events; events/s and peak
  # memory (max RSS, /usr/bin/time).
  cargo build --release --quiet
  bin=$root/target/release/riskd
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  events=${RISKD_BENCH_EVENTS:-1000000}
  "$bin" generate --events "$events" --users 10000 > "$work/events.jsonl"
  for round in 1 2 3; do
    for delay in 0s 5s 1m; do
      d="$work/$delay-$round"; mkdir -p "$d"
      cat > "$d/riskd.toml" <<TOML
[source]
path = "$work/events.jsonl"
[sink]
path = "alerts.jsonl"
[store]
kind = "embedded"
path = "state.redb"
flush_every_events = 100000
flush_interval = "2s"
[rules]
paths = ["$root/config/rules"]
[telemetry]
listen = ""
[event_time]
max_delay = "$delay"
TOML
      start=$(date +%s.%N)
      (cd "$d" && /usr/bin/time -f "%M" -o rss "$bin" run --config riskd.toml 2> summary.txt)
      secs=$(echo "$(date +%s.%N) - $start" | bc)
      echo "round $round max_delay=$delay: $(echo "$events / $secs" | bc) events/s, max RSS $(( $(cat "$d/rss") / 1024 )) MiB; $(tail -1 "$d/summary.txt")"
    done
  done
fi
