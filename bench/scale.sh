#!/usr/bin/env bash
# Scale: a separate lottery-server under /usr/bin/time -v, its agencies run by
# `lottery-round --server`; prints the round's table, its wall time and the server's peak RSS.
#
#   bench/scale.sh AGENCIES BETS_PER_AGENCY     # e.g. 1000 100, 5 200000, 5 2000000
#   SECURITY=plain bench/scale.sh …             # without TLS and tokens
#   ROUND_LOG=FILE bench/scale.sh …             # keep the round's stderr (its progress, a failure)
set -euo pipefail
agencies=${1:?usage: bench/scale.sh AGENCIES BETS_PER_AGENCY}
bets=${2:?usage: bench/scale.sh AGENCIES BETS_PER_AGENCY}
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
cargo build --release --quiet
bin=$PWD/target/release
work=$(mktemp -d)
cleanup() {
  if [[ -n ${server_pid:-} ]]; then kill -TERM "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
"$bin/lottery-round" --generate "$work/data" --agencies "$agencies" --bets-per-agency "$bets" >/dev/null
# TLS and agency tokens, as deployed (SECURITY=plain: neither, the server in protected mode).
security_setup "$bin" "$work/keys" "$agencies"

SERVER_IP=127.0.0.1 SERVER_PORT=0 SERVER_AGENCIES=$agencies SERVER_STORAGE_PATH=$work/bets.csv \
  SERVER_MAX_CONNECTIONS=$((agencies + ${SERVER_MAX_GUESTS:-256})) \
  /usr/bin/time -v -o "$work/time" "$bin/lottery-server" >"$work/server.log" 2>&1 &
time_pid=$!
port=$(server_port "$work/server.log")
server_pid=$(pgrep -P "$time_pid" lottery-server)

"$bin/lottery-round" --server "127.0.0.1:$port" --agencies "$agencies" --data "$work/data" 2>"${ROUND_LOG:-/dev/null}" |
  grep -Ev '^ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9]+$' || true
kill -TERM "$server_pid"
wait "$time_pid"
server_pid=
echo "server peak RSS: $(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time") KiB" \
  "(bets.csv: $(du -h "$work/bets.csv" | cut -f1))"
