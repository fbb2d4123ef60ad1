#!/usr/bin/env bash
# A round with real processes: one lottery-server and one lottery-agency per agency-N.csv in
# DATA_DIR (e.g. the course's data set), over loopback. Prints each agency's winner count, the
# rows in bets.csv, and the wall time from the agencies' start to the last one's exit.
#
#   bench/processes.sh DATA_DIR
#
# SECURITY=tls (the default: TLS and agency tokens, from keys made with --make-keys into the
# scratch directory) or SECURITY=plain (no TLS, no tokens: the server in protected mode).
set -euo pipefail
data=$(cd "${1:?usage: bench/processes.sh DATA_DIR}" && pwd)
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
cargo build --release --quiet
bin=$PWD/target/release
agencies=$(count_agencies "$data")
work=$(mktemp -d)
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  if [[ -n ${server:-} ]] && kill -TERM "$server" 2>/dev/null; then
    wait "$server" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

security_setup "$bin" "$work/keys" "$agencies"
echo "security: ${SECURITY:-tls}"

SERVER_IP=127.0.0.1 SERVER_PORT=0 SERVER_AGENCIES=$agencies SERVER_STORAGE_PATH=$work/bets.csv \
  "$bin/lottery-server" >"$work/server.log" 2>&1 &
server=$!
port=$(server_port "$work/server.log")

start=$(date +%s.%N)
pids=()
for id in $(seq "$agencies"); do
  CLI_ID=$id CLI_SERVER_ADDRESS=127.0.0.1:$port CLI_DATA_PATH=$data/agency-$id.csv \
    "$bin/lottery-agency" >"$work/agency-$id.log" 2>&1 &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
end=$(date +%s.%N)

for id in $(seq "$agencies"); do
  winners=$(sed -n 's/.*consulta_ganadores | result: success | cant_ganadores: \([0-9]*\).*/\1/p' "$work/agency-$id.log")
  echo "agency $id: ${winners:-FAILED} winners"
done
echo "bets.csv: $(wc -l <"$work/bets.csv") rows; draws logged: $(grep -c 'action: sorteo | result: success' "$work/server.log")"
echo "wall time: $(awk -v s="$start" -v e="$end" 'BEGIN {printf "%.3f", e - s}') s"
exit "$failed"
