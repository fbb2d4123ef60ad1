#!/usr/bin/env bash
# Instructions per bet, counted by callgrind: one lottery-server and agency 1 run under
# `valgrind --tool=callgrind` (the other agencies run natively), over a whole round from the
# server's exec to its shutdown (start-up, draw and shutdown included). Instruction counts do not
# swing with the machine's load the way wall times do, so they are the yardstick of speed work.
# Prints instructions per bet for each side and each side's ten most expensive functions
# (instructions spent in the function itself).
#
#   bench/instructions.sh [DATA_DIR]     # agency-N.csv files; default: a generated round of the
#                                        # course's size (5 agencies × 15,740 bets)
#
# SECURITY=tls (the default: TLS and agency tokens) or SECURITY=plain, as in bench/processes.sh.
# SERVER_SYNC and the other settings pass through from the environment. Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
command -v valgrind >/dev/null || { echo "bench/instructions.sh needs valgrind" >&2; exit 1; }
cargo build --release --quiet
bin=$PWD/target/release
work=$(mktemp -d)
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  if [[ -n ${server:-} ]] && kill -TERM "$server" 2>/dev/null; then
    wait "$server" || true
  fi
  [[ -n ${KEEP:-} ]] || rm -rf "$work"; [[ -z ${KEEP:-} ]] || echo "kept $work" >&2
}
trap cleanup EXIT

if [[ -n ${1:-} ]]; then
  data=$(cd "$1" && pwd)
else
  data=$work/data
  "$bin/lottery-round" --generate "$data" --agencies 5 --bets-per-agency 15740 >/dev/null
fi
agencies=$(count_agencies "$data")
security_setup "$bin" "$work/keys" "$agencies"
callgrind=(valgrind --tool=callgrind --dump-instr=no --compress-strings=no --compress-pos=no)

SERVER_IP=127.0.0.1 SERVER_PORT=0 SERVER_AGENCIES=$agencies SERVER_STORAGE_PATH=$work/bets.csv \
  "${callgrind[@]}" --callgrind-out-file="$work/server.out" "$bin/lottery-server" \
  >"$work/server.log" 2>"$work/server.err" &
server=$!
port=$(server_port "$work/server.log")

pids=()
for id in $(seq "$agencies"); do
  run=("$bin/lottery-agency")
  [[ $id -eq 1 ]] && run=("${callgrind[@]}" --callgrind-out-file="$work/agency.out" "${run[@]}")
  CLI_ID=$id CLI_SERVER_ADDRESS=127.0.0.1:$port CLI_DATA_PATH=$data/agency-$id.csv \
    "${run[@]}" >"$work/agency-$id.log" 2>"$work/agency-$id.err" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
kill -TERM "$server"
wait "$server" || failed=1
server=
if [[ $failed -ne 0 ]]; then
  echo "the round failed; logs:" >&2
  tail -n 5 "$work"/*.log "$work"/*.err >&2
  exit 1
fi

# The total of a callgrind output file: its `summary:` (or `totals:`) line.
total() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
# The ten functions with the most instructions of their own: count, share, function (code
# inlined from other files is listed by callgrind_annotate under each file: summed here).
top() {
  callgrind_annotate --inclusive=no "$1" 2>/dev/null >"$1.txt" || true
  awk -v total="$(total "$1")" '/file:function/ {on = 1; next}
       on && /^-+$/ {next}
       on && !NF {exit}
       on && $1 ~ /^[0-9,]+$/ {
         fn = $0; sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, "", fn); sub(/^[^:]*:/, "", fn); sub(/ \[.*$/, "", fn)
         n = $1; gsub(/,/, "", n); own[fn] += n
       }
       END { for (fn in own) printf "%14d %6.2f%%  %s\n", own[fn], 100 * own[fn] / total, fn }' "$1.txt" |
    sort -rn | head -n 10
}
# Start-up: a server restarted on this round's files (recovery reads bets.csv back, and the
# round was drawn), from exec to listening; it is stopped as soon as it listens.
mkdir "$work/restart"
cp "$work/bets.csv" "$work/bets.csv.round" "$work/restart/"
SERVER_IP=127.0.0.1 SERVER_PORT=0 SERVER_AGENCIES=$agencies SERVER_STORAGE_PATH=$work/restart/bets.csv \
  "${callgrind[@]}" --callgrind-out-file="$work/restart.out" --toggle-collect='*server::run*' --collect-atstart=yes \
  "$bin/lottery-server" >"$work/restart.log" 2>"$work/restart.err" &
server=$!
server_port "$work/restart.log" >/dev/null
kill -TERM "$server"
wait "$server" || true
server=

bets=$(wc -l <"$work/bets.csv")
agency_bets=$(wc -l <"$data/agency-1.csv")
server_total=$(total "$work/server.out")
agency_total=$(total "$work/agency.out")
echo "round: $agencies agencies, $bets bets from $data; SERVER_SYNC=${SERVER_SYNC:-always}, SECURITY=${SECURITY:-tls}"
echo "winners: $(for id in $(seq "$agencies"); do
  sed -n 's/.*cant_ganadores: \([0-9]*\).*/\1/p' "$work/agency-$id.log"
done | paste -sd, -)"
printf 'server:   %d instructions, %d per bet (of %d)\n' "$server_total" $((server_total / bets)) "$bets"
printf 'agency 1: %d instructions, %d per bet (of %d)\n' "$agency_total" $((agency_total / agency_bets)) "$agency_bets"
printf 'server restarted on these files: %d instructions from exec to listening\n' "$(total "$work/restart.out")"
echo "server, top ten functions (own instructions):"
top "$work/server.out"
echo "agency 1, top ten functions (own instructions):"
top "$work/agency.out"
