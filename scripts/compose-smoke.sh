#!/usr/bin/env bash
# Smoke test of the compose setup, end to end, against a running Docker engine:
#
#   1. `docker-compose build` (the image lottery:latest);
#   2. generates a data set with the image's lottery-round into a temporary directory
#      (the compose file mounts it through LOTTERY_DATA_DIR; the repository's .data is untouched);
#   3. an interrupted round: the server and every agency but the last; once those have said DONE
#      and wait for the draw, `down` (the named volume kept): every container exits 0;
#   4. `up`: the server resumes the round, every agency exits 0 and logs `consulta_ganadores`
#      with as many winners as its file has rows ending in 7574, the server logs `sorteo` once,
#      no log line says `result: fail`, and scripts/probe.sh sees drawn=true and every bet;
#   5. `down`: the server exits 0 and logs its clean shutdown;
#   6. `up` again: the server opens the round already drawn, does not draw again, and the
#      agencies get the same winners;
#   7. the server stopped (exit code 0): scripts/probe.sh fails;
#   8. `down -v`, always, also on failure or Ctrl-C;
#   9. scripts/compose-smoke-replicas.sh: docker-compose.replicas.yaml (PostgreSQL, two
#      replicas), one replica killed mid-round.
#
#   scripts/compose-smoke.sh
#
# It runs under its own compose project name (lottery-smoke-<pid>), so it never touches the
# containers, network or volume of a user's `docker-compose up`. Exits non-zero on any miss.
# Environment: SMOKE_BETS_PER_AGENCY (default 4000), SMOKE_TIMEOUT seconds per wait (default 300).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
agencies=5
bets=${SMOKE_BETS_PER_AGENCY:-4000}
wait_s=${SMOKE_TIMEOUT:-300}
project=lottery-smoke-$$
image=lottery:latest
work=$(mktemp -d -t lottery-smoke.XXXXXX)
data=$work/data
mkdir -p "$data"

name=compose-smoke
compose_file=$repo/docker-compose.yaml
# shellcheck source=scripts/compose-lib.sh
source "$repo/scripts/compose-lib.sh"

# Waits for every agency container to exit and checks each exited 0.
wait_agencies() {
  local id cid code
  for ((id = 1; id <= agencies; id++)); do
    cid=$(container "agency$id")
    [[ -n $cid ]] || die "agency$id has no container"
    code=$(timeout "$wait_s" docker wait "$cid") || die "agency$id still running after ${wait_s}s"
    [[ $code == 0 ]] || die "agency$id exited $code: $(logs "agency$id" | tail -n 3)"
  done
}

# Checks each agency logged as many winners as its file has.
check_winners() {
  local id line got
  for ((id = 1; id <= agencies; id++)); do
    line=$(logs "agency$id" | grep 'action: consulta_ganadores | result: success' || true)
    [[ -n $line ]] || die "agency$id logged no consulta_ganadores success"
    got=${line##*cant_ganadores: }
    [[ $got == "${expected[id]}" ]] || die "agency$id: cant_ganadores $got, its file has ${expected[id]} winners"
  done
}

# `down`, checking from the engine's own events that `stops` containers stopped, each with exit
# code 0 (a SIGKILL after the grace period would show as 137), and that the server logged its
# clean shutdown.
down_clean() {
  local stops=$1 since until server deaths bad
  server=$(container server)
  docker logs -f "$server" >"$work/server-tail.log" 2>&1 &
  local follower=$!
  since=$(date +%s)
  compose down >>"$work/compose.log" 2>&1 || die "docker-compose down failed"
  until=$(date +%s)
  wait "$follower" || true
  deaths=$(docker events --since "$since" --until "$((until + 1))" --filter event=die \
    --filter "label=com.docker.compose.project=$project" \
    --format '{{index .Actor.Attributes "com.docker.compose.service"}} {{.Actor.Attributes.exitCode}}')
  grep -q '^server ' <<<"$deaths" || die "down: no stop of the server seen"
  [[ $(wc -l <<<"$deaths") == "$stops" ]] || die "down: $stops containers should have stopped: ${deaths//$'\n'/, }"
  bad=$(grep -v ' 0$' <<<"$deaths" || true)
  [[ -z $bad ]] || die "down: containers exited non-zero: $(tr '\n' ';' <<<"$bad")"
  grep -q 'action: shutdown | result: success' "$work/server-tail.log" \
    || die "down: the server did not log its clean shutdown"
  deaths=${deaths// / exited }
  say "down in $((until - since))s: ${deaths//$'\n'/, }; the server logged its clean shutdown"
}

docker info >/dev/null 2>&1 || die "the docker engine does not answer"
say "project $project, ${compose_cmd[*]}, $agencies agencies x $bets bets"

say "building the image"
compose build >>"$work/compose.log" 2>&1 || die "docker-compose build failed"

say "generating the data set in $data"
generate_data

# Probes until the STATUS line matches, or gives up after $wait_s seconds.
await_status() {
  local pattern=$1 deadline=$((SECONDS + wait_s)) probe=
  while ((SECONDS < deadline)); do
    probe=$("$repo/scripts/probe.sh" -p "$project") || true
    grep -q "$pattern" <<<"$probe" && return 0
    sleep 1
  done
  die "no STATUS matching '$pattern' within ${wait_s}s; the last probe said: $probe"
}

waiting=$((agencies - 1))
say "round, part 1: the server and agencies 1..$waiting; down while they wait for the draw"
compose up -d server $(seq -f 'agency%g' 1 "$waiting") >>"$work/compose.log" 2>&1 || die "docker-compose up failed"
await_status "^STATUS agencies_done=$waiting/$agencies "
down_clean "$agencies"

say "round, part 2: up with every agency; the server resumes the round"
compose up -d >>"$work/compose.log" 2>&1 || die "docker-compose up failed"
wait_agencies
opened=$(logs server | grep 'action: open_storage' || true)
grep -q "agencies_done: $waiting | drawn: false" <<<"$opened" \
  || die "part 2: the server did not resume the round: ${opened:-no open_storage line}"
check_winners
sorteos=$(logs server | grep -c 'action: sorteo | result: success' || true)
[[ $sorteos == 1 ]] || die "part 2: the server logged sorteo $sorteos times"
for svc in server $(seq -f 'agency%g' 1 "$agencies"); do
  if logs "$svc" | grep -q 'result: fail'; then
    die "part 2: $svc logged a fail: $(logs "$svc" | grep -m 1 'result: fail')"
  fi
done
probe=$("$repo/scripts/probe.sh" -p "$project") || die "probe failed on the running round: $probe"
grep -qx "STATUS agencies_done=$agencies/$agencies bets=$((agencies * bets)) drawn=true" <<<"$probe" \
  || die "probe: unexpected status: $probe"
say "part 2: agencies exited 0 with ${expected[*]} winners, one sorteo, no fail; probe: $(head -n 1 <<<"$probe")"

down_clean 1

say "up again after down, the volume kept"
compose up -d >>"$work/compose.log" 2>&1 || die "second docker-compose up failed"
wait_agencies
opened=$(logs server | grep 'action: open_storage' || true)
grep -q "bets: $((agencies * bets)) .*drawn: true" <<<"$opened" \
  || die "again: the server did not find the round drawn: ${opened:-no open_storage line}"
if logs server | grep -q 'action: sorteo'; then die "again: the server drew again"; fi
check_winners
say "again: the server found the round drawn, drew nothing, agencies got the same winners"

say "probe with the server stopped"
compose stop server >>"$work/compose.log" 2>&1 || die "docker-compose stop server failed"
if probe=$("$repo/scripts/probe.sh" -p "$project"); then die "probe succeeded with the server stopped"; fi
grep -q 'action: probe | result: fail' <<<"$probe" || die "probe did not say fail: $probe"
code=$(docker inspect --format '{{.State.ExitCode}}' "$(container server)")
[[ $code == 0 ]] || die "docker-compose stop: the server exited $code"
say "probe: $probe"

say "the replicas: docker-compose.replicas.yaml, one replica killed mid-round"
"$repo/scripts/compose-smoke-replicas.sh" || die "scripts/compose-smoke-replicas.sh failed"

say "ok: build, a round resumed after down, clean downs, the drawn round kept across down/up, probe success and fail, replicas"
