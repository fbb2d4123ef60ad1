#!/usr/bin/env bash
# The file ledger against the PostgreSQL ledger with one and with two replicas: one
# lottery-agency process per agency-N.csv in DATA_DIR, over loopback, the three set-ups
# interleaved RUNS times. With two replicas, odd agencies talk to one and even ones to the other.
# PostgreSQL is a throw-away cluster of scripts/pg-test-cluster.sh with fsync on (durable, as the
# file ledger's SERVER_SYNC=always is); every run gets a database of its own. Prints every run
# (wall time from the agencies' start to the last one's exit, winners, rows, draws), then medians.
# Plain text, no tokens (the server in protected mode): what is compared is the ledgers.
#
#   RUNS=3 bench/ledgers.sh DATA_DIR
set -euo pipefail
data=$(cd "${1:?usage: bench/ledgers.sh DATA_DIR}" && pwd)
runs=${RUNS:-3}
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
cargo build --release --quiet
bin=$PWD/target/release
agencies=$(count_agencies "$data")
work=$(mktemp -d)
pg=$(mktemp -d -t lottery-bench-pg-XXXXXX)
servers=()
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  stop_servers
  scripts/pg-test-cluster.sh stop "$pg" || true
  rm -rf "$work" "$pg"
}
stop_servers() {
  for pid in "${servers[@]}"; do kill -TERM "$pid" 2>/dev/null && wait "$pid" || true; done
  servers=()
}
trap cleanup EXIT
export SERVER_AGENCY_KEYS='' SERVER_TLS_CERT='' SERVER_TLS_KEY='' CLI_TLS_CA='' CLI_TOKEN_FILE=''
url=$(PG_TEST_FSYNC=on scripts/pg-test-cluster.sh start "$pg")

# Starts a server with the given extra settings and adds its port to `ports` (not in a
# subshell: `servers` must see its pid).
start_server() {
  local log=$1
  shift
  env SERVER_IP=127.0.0.1 SERVER_PORT=0 SERVER_AGENCIES="$agencies" "$@" "$bin/lottery-server" >"$log" 2>&1 &
  servers+=($!)
  ports+=("$(server_port "$log")")
}

# One round in set-up $1 (file, pg1, pg2), run $2; prints one line and records the time.
round() {
  local setup=$1 run=$2 dir=$work/$1-$2 ports=() start end pids=() id
  mkdir -p "$dir"
  case $setup in
    file) start_server "$dir/server-1.log" SERVER_STORAGE_PATH="$dir/bets.csv" ;;
    pg1 | pg2)
      psql "$url" -qc "CREATE DATABASE r_${setup}_$run"
      for n in $(seq "${setup#pg}"); do
        start_server "$dir/server-$n.log" SERVER_DATABASE_URL="${url%/*}/r_${setup}_$run"
      done
      ;;
  esac
  start=$(date +%s.%N)
  for id in $(seq "$agencies"); do
    CLI_ID=$id CLI_SERVER_ADDRESS=127.0.0.1:${ports[$(((id - 1) % ${#ports[@]}))]} \
      CLI_DATA_PATH=$data/agency-$id.csv "$bin/lottery-agency" >"$dir/agency-$id.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  end=$(date +%s.%N)
  stop_servers
  local winners rows draws time
  winners=$(cat "$dir"/agency-*.log | sed -n 's/.*cant_ganadores: \([0-9]*\).*/\1/p' | paste -sd, -)
  case $setup in
    file) rows=$(wc -l <"$dir/bets.csv") ;;
    *) rows=$(psql "${url%/*}/r_${setup}_$run" -tAc "SELECT count(*) FROM lottery_bet") ;;
  esac
  draws=$(cat "$dir"/server-*.log | grep -c 'action: sorteo | result: success')
  time=$(awk -v s="$start" -v e="$end" 'BEGIN {printf "%.3f", e - s}')
  printf '%-5s run %s: %s s  winners %s  rows %s  draws %s\n' "$setup" "$run" "$time" "$winners" "$rows" "$draws"
  printf '%s\t%s\n' "$setup" "$time" >>"$work/times"
}

for run in $(seq "$runs"); do
  for setup in file pg1 pg2; do round "$setup" "$run"; done
done
echo "medians of $runs runs:"
for setup in file pg1 pg2; do
  median=$(awk -F'\t' -v m="$setup" '$1 == m {print $2}' "$work/times" | sort -n |
    awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')
  printf '%-5s %s s\n' "$setup" "$median"
done
