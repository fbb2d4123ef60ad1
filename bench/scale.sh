#!/usr/bin/env bash
# Scale: a separate lottery-server under /usr/bin/time -v, its agencies run by
# `lottery-round --server`; prints the round's table, its wall time, the server's CPU per agency
# (user + sys over its whole life), its peak RSS, the agencies' reconnects (`action: reconnect`
# lines), and, from a second run of its own under `strace -c -f`, the server's fsync and
# fdatasync calls. Ends with one Markdown table row (after its header) for the README.
#
#   bench/scale.sh AGENCIES BETS_PER_AGENCY     # e.g. 1000 100, 5 200000, 5 2000000
#   SECURITY=plain bench/scale.sh …             # without TLS and tokens
#   ROUND_LOG=FILE bench/scale.sh …             # keep the round's stderr (its progress, a failure)
#   SYSCALLS=0 bench/scale.sh …                 # skip the strace run (fsyncs: n/a)
#   BIN=DIR bench/scale.sh …                    # the binaries in DIR (another build, to compare)
#   FLOOR=0 bench/scale.sh …                    # skip the floor (below)
#
# The floor: what the same number of agencies, with ten bets each, cost a server with no thread
# per connection, no lock, no disk and no log (`--example agency_floor`, in TLS or plain text as
# SECURITY says), measured right after the round, and the server's CPU per agency against it.
set -euo pipefail
agencies=${1:?usage: bench/scale.sh AGENCIES BETS_PER_AGENCY}
bets=${2:?usage: bench/scale.sh AGENCIES BETS_PER_AGENCY}
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
if [[ -z ${BIN:-} ]]; then
  cargo build --release --quiet
fi
bin=${BIN:-$PWD/target/release}
work=$(mktemp -d)
cleanup() {
  if [[ -n ${server_pid:-} ]]; then kill -TERM "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
"$bin/lottery-round" --generate "$work/data" --agencies "$agencies" --bets-per-agency "$bets" >/dev/null
# TLS and agency tokens, as deployed (SECURITY=plain: neither, the server in protected mode).
security_setup "$bin" "$work/keys" "$agencies"
# Room for every agency at once, in the connections and in the listen queue.
export SERVER_IP=127.0.0.1 SERVER_PORT=0 SERVER_AGENCIES=$agencies \
  SERVER_MAX_CONNECTIONS=$((agencies + ${SERVER_MAX_GUESTS:-256})) \
  SERVER_LISTEN_BACKLOG=$(((agencies + 64) < 65535 ? agencies + 64 : 65535))

# One round: the server under WRAPPER (a command prefix), its agencies by lottery-round;
# the round's stdout (with the agencies' log lines) into $work/round.$1.
round() {
  local name=$1
  shift
  rm -f "$work"/bets.csv*
  SERVER_STORAGE_PATH=$work/bets.csv "$@" "$bin/lottery-server" >"$work/server.log" 2>&1 &
  wrapper_pid=$!
  port=$(server_port "$work/server.log")
  server_pid=$(pgrep -P "$wrapper_pid" lottery-server)
  # The server's own memory before any agency: what "per agency" is counted above.
  base_rss=$(awk '/^VmRSS/ {print $2}' "/proc/$server_pid/status")
  "$bin/lottery-round" --server "127.0.0.1:$port" --agencies "$agencies" --data "$work/data" --verbose \
    >"$work/round.$name" 2>"${ROUND_LOG:-/dev/null}" || true
  [[ -n ${KEEP_ROUND:-} ]] && cp "$work/round.$name" "$KEEP_ROUND.$name" && cp "$work/server.log" "$KEEP_ROUND.server.$name"
  kill -TERM "$server_pid"
  wait "$wrapper_pid" || true
  server_pid=
}

round time /usr/bin/time -v -o "$work/time"
# The round's own lines (not the agencies' log lines), without the per-agency rows.
grep -Ev '^[0-9]{4}-[0-9]{2}-[0-9]{2} |^ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9]+$' "$work/round.time" || true
field() { awk -F': ' -v key="$1" '$1 ~ key {print $2}' "$work/time"; }
user=$(field 'User time'); sys=$(field 'System time'); rss=$(field 'Maximum resident set size')
cpu_ms=$(awk -v u="$user" -v s="$sys" -v n="$agencies" 'BEGIN {printf "%.3f", (u + s) * 1000 / n}')
reconnects=$(grep -c 'action: reconnect' "$work/round.time" || true)
wall=$(sed -n 's/^wall time \([0-9.]*\) s.*/\1/p' "$work/round.time")
rss_per_agency=$(awk -v r="$rss" -v b="$base_rss" -v n="$agencies" 'BEGIN {printf "%.1f", (r - b) / n}')
echo "server CPU: ${user} s user + ${sys} s sys = ${cpu_ms} ms per agency; peak RSS: ${rss} KiB," \
  "${rss_per_agency} KiB per agency above its ${base_rss} KiB at start" \
  "(bets.csv: $(du -h "$work/bets.csv" | cut -f1)); reconnects: ${reconnects}"

fsyncs=n/a
if [[ ${SYSCALLS:-1} != 0 ]] && command -v strace >/dev/null; then
  round strace strace -c -f --seccomp-bpf -e trace=fsync,fdatasync -o "$work/strace"
  fsyncs=$(awk '$NF == "fsync" || $NF == "fdatasync" {n += $4} END {print n + 0}' "$work/strace")
  echo "server fsync + fdatasync calls (a run of its own, under strace): ${fsyncs}"
fi

if [[ ${FLOOR:-1} != 0 ]]; then
  cargo build --release --quiet --example agency_floor
  floor_line=$(target/release/examples/agency_floor "$agencies" "${SECURITY:-tls}")
  floor_ms=$(sed -n 's/.*: server \([0-9.]*\) ms.*/\1/p' <<<"$floor_line")
  echo "floor: ${floor_line}; this server: $(awk -v c="$cpu_ms" -v f="$floor_ms" 'BEGIN {printf "%.1f", c / f}')× it"
fi

echo "| agencies | bets/agency | round wall s | server CPU ms/agency | server peak RSS MiB | KiB/agency above start | reconnects | fsync+fdatasync |"
echo "| ${agencies} | ${bets} | ${wall:-failed} | ${cpu_ms} | $((rss / 1024)) | ${rss_per_agency} | ${reconnects} | ${fsyncs} |"
