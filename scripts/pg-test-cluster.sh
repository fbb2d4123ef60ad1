#!/usr/bin/env bash
# A throw-away PostgreSQL cluster on a free loopback port, for the tests and the benchmarks.
#
#   scripts/pg-test-cluster.sh start DIR   initdb in DIR (new or empty), start it, print its URL
#   scripts/pg-test-cluster.sh stop DIR    stop the cluster in DIR (removing DIR is the caller's)
#   scripts/pg-test-cluster.sh serve       start one in a new temporary directory, print its URL,
#                                          then stop and remove it when standard input closes (the
#                                          tests do this when SERVER_DATABASE_URL is unset)
#
# The URL is postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres: the cluster listens on loopback
# only, asks a password over TCP (scram-sha-256, a random one made here, as a real server would, so
# that a wrong password can be tested), and trusts its own Unix socket in DIR.
# As root the cluster runs as the `postgres` user: initdb refuses root. PostgreSQL's binaries are
# found through PG_BIN, pg_config, or /usr/lib/postgresql/*/bin (Debian's postgresql package).
# PG_TEST_FSYNC=off makes a faster cluster that loses commits on a power loss (fine for tests,
# never for a measurement); the default is on.
set -euo pipefail

die() { echo "pg-test-cluster: $*" >&2; exit 1; }

bindir() {
  if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
  if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/pg_ctl" ]]; then pg_config --bindir; return; fi
  local dir
  dir=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
  [[ -n "$dir" && -x "$dir/pg_ctl" ]] || die "no PostgreSQL binaries (install the postgresql package, or set PG_BIN)"
  echo "$dir"
}

# Runs a command as the cluster's owner.
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  local dir=$1 bin port try password
  bin=$(bindir)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [[ $(id -u) -eq 0 ]]; then
    chown postgres: "$dir"
    runuser -u postgres -- test -w "$dir" || die "the postgres user cannot reach $dir (its parents must let it through)"
  fi
  password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  (umask 077 && echo "$password" >"$dir/password")
  [[ $(id -u) -eq 0 ]] && chown postgres: "$dir/password"
  as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$dir/password" -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
    || die "initdb failed: see $dir/initdb.log"
  rm -f "$dir/password"
  for try in $(seq 1 20); do
    port=$((20000 + RANDOM % 40000))
    port_in_use "$port" && continue
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 -o \
      "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=${PG_TEST_FSYNC:-on} -c max_connections=300" \
      start >/dev/null; then
      echo "postgres://postgres:$password@127.0.0.1:$port/postgres"
      return
    fi
  done
  die "could not start PostgreSQL after $try tries: see $dir/postgres.log"
}

stop() {
  local dir=$1
  [[ -f "$dir/data/postmaster.pid" ]] || return 0
  as_owner "$(bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
}

case "${1:-}" in
  start) [[ $# -eq 2 ]] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [[ $# -eq 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
  serve)
    dir=$(mktemp -d -t lottery-pg-XXXXXX)
    trap 'stop "$dir" || true; rm -rf "$dir"' EXIT
    start "$dir"
    # Until whoever started us goes away (our standard input closes).
    cat >/dev/null
    ;;
  *) die "usage: $0 start DIR | stop DIR | serve" ;;
esac
