#!/usr/bin/env bash
# Throughput of the durability modes, measured with lottery-round: 5 agencies, 1,000,000 bets
# (BETS per agency), the default batch. The three modes run interleaved, RUNS times each, so
# that the machine's noise falls on all of them alike; prints every run, then the medians.
#
#   bench/sync.sh              # RUNS=3 BETS=200000
set -euo pipefail
runs=${RUNS:-3}
bets=${BETS:-200000}
cd "$(dirname "$0")/.."
cargo build --release --quiet
round=./target/release/lottery-round
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$round" --generate "$work/data" --bets-per-agency "$bets" >/dev/null

modes=("SERVER_SYNC=always" "SERVER_SYNC=never" "SERVER_SYNC=always SERVER_GROUP_COMMIT=false")
for run in $(seq "$runs"); do
  for mode in "${modes[@]}"; do
    # shellcheck disable=SC2086 # $mode is one or two VAR=value words
    rate=$(env $mode "$round" --data "$work/data" 2>/dev/null | awk '/^wall time/ {print $5}')
    printf '%-45s run %s: %s bets/s\n' "$mode" "$run" "$rate"
    printf '%s\t%s\n' "$mode" "$rate" >>"$work/rates"
  done
done
echo "medians of $runs runs, $((bets * 5)) bets each:"
for mode in "${modes[@]}"; do
  median=$(awk -F'\t' -v m="$mode" '$1 == m {print $2}' "$work/rates" | sort -n |
    awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')
  printf '%-45s %s bets/s\n' "$mode" "$median"
done
