#!/usr/bin/env bash
# Smoke test of docker-compose.replicas.yaml against a running Docker engine: PostgreSQL, two
# lottery-server replicas, five agencies, and one replica killed mid-round.
#
#   1. builds the image and generates a data set (as scripts/compose-smoke.sh does);
#   2. `up`: db, keys, server1, server2, then the agencies (odd ones on server1, even ones on
#      server2, each knowing both);
#   3. once server1 has acknowledged some batches, SIGKILL of server1 (`docker kill`);
#   4. every agency exits 0 with as many winners as its file has, having ended on server2;
#      one `sorteo` in all, and no `result: fail` from server2;
#   5. `lottery-server --export-bets` in server2 equals the agencies' files as a multiset;
#   6. `down -v`, always, also on failure or Ctrl-C; on a failure every container's log is saved
#      first, and the temporary directory kept, its path printed.
#
#   scripts/compose-smoke-replicas.sh          (scripts/compose-smoke.sh runs it after its own)
#
# Own compose project name (lottery-replicas-<pid>) and image (LOTTERY_IMAGE, default
# lottery-replicas-smoke:latest). Environment: SMOKE_BETS_PER_AGENCY (default
# 20000: enough for the kill to land mid-round), SMOKE_TIMEOUT seconds per wait (default 300).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
agencies=5
bets=${SMOKE_BETS_PER_AGENCY:-20000}
wait_s=${SMOKE_TIMEOUT:-300}
project=lottery-replicas-$$
# An image of its own, so that a build here never changes the lottery:latest another run uses
# (kept, like lottery:latest, so that the next run's build is cached).
export LOTTERY_IMAGE=${LOTTERY_IMAGE:-lottery-replicas-smoke:latest}
image=$LOTTERY_IMAGE
work=$(mktemp -d -t lottery-replicas.XXXXXX)
data=$work/data
mkdir -p "$data"

name=compose-smoke-replicas
compose_file=$repo/docker-compose.replicas.yaml
# shellcheck source=scripts/compose-lib.sh
source "$repo/scripts/compose-lib.sh"

docker info >/dev/null 2>&1 || die "the docker engine does not answer"
say "project $project, ${compose_cmd[*]}, $agencies agencies x $bets bets, two replicas"
compose build >>"$work/compose.log" 2>&1 || die "docker-compose build failed"
generate_data

compose up -d >>"$work/compose.log" 2>&1 || die "docker-compose up failed"

say "waiting for server1 to acknowledge 20 batches, then SIGKILL"
deadline=$((SECONDS + wait_s))
until (($(logs server1 | grep -c 'action: apuesta_recibida | result: success' || true) >= 20)); do
  ((SECONDS < deadline)) || die "server1 acknowledged no 20 batches within ${wait_s}s"
  sleep 0.2
done
docker kill --signal KILL "$(container server1)" >>"$work/compose.log" 2>&1 || die "docker kill server1 failed"
if in_log server1 'action: sorteo'; then
  die "the round was over before the kill: raise SMOKE_BETS_PER_AGENCY"
fi

for ((id = 1; id <= agencies; id++)); do
  code=$(timeout "$wait_s" docker wait "$(container "agency$id")") || die "agency$id still running after ${wait_s}s"
  [[ $code == 0 ]] || die "agency$id exited $code: $(logs "agency$id" | tail -n 3)"
  line=$(logs "agency$id" | grep 'action: consulta_ganadores | result: success' || true)
  [[ ${line##*cant_ganadores: } == "${expected[id]}" ]] || die "agency$id: ${line:-no winners}, expected ${expected[id]}"
  # Wherever it started (server1 may have died before it first connected), it ended on server2.
  if ! in_log "agency$id" -F 'action: connect | result: success | address: server2:12345'; then
    die "agency$id did not move to server2"
  fi
done
draws=$(( $(logs server1 | grep -c 'action: sorteo' || true) + $(logs server2 | grep -c 'action: sorteo' || true) ))
[[ $draws == 1 ]] || die "$draws sorteo lines across the replicas"
if in_log server2 'result: fail'; then die "server2 logged a fail: $(logs server2 | grep -m 1 'result: fail')"; fi
say "agencies exited 0 with ${expected[*]} winners after server1 was killed; one sorteo"

compose exec -T server2 lottery-server --export-bets /tmp/export.csv >>"$work/compose.log" 2>&1 \
  || die "--export-bets failed"
docker cp "$(container server2):/tmp/export.csv" "$work/export.csv" >>"$work/compose.log" 2>&1 || die "docker cp failed"
for ((id = 1; id <= agencies; id++)); do sed "s/^/$id,/" "$data/agency-$id.csv"; done | sort >"$work/expected.csv"
sort "$work/export.csv" | cmp -s - "$work/expected.csv" || die "the export differs from the agencies' files"
say "ok: a replica killed mid-round, the round completed exact on the other, export = input"
