#!/usr/bin/env bash
# Smoke test of the compose setup, end to end, against a running Docker engine:
#
#   1. `docker-compose build` (the image, tagged lottery-smoke-<pid>:latest);
#   2. generates a data set with the image's lottery-round into a temporary directory
#      (the compose file mounts it through LOTTERY_DATA_DIR; the repository's .data is untouched);
#   3. an interrupted round: the server and every agency but the last. The keys service makes the
#      keys (its log says `made: true`), the server listens with `tls: true | agency_keys: true`,
#      each agency's /app/.secrets holds only ca.pem and its own token (the server's only
#      server.pem, server.key and agencies.keys), owned by uid 10001, directory 0700, secrets
#      0600; once those agencies have said DONE (over TLS, with their tokens) and wait for the
#      draw, `down` (the named volumes kept): every container exits 0;
#   4. `up`: the keys service makes none (`made: false`) and the keys on the volume are the same
#      (checksums); the server resumes the round, every agency exits 0 and logs
#      `consulta_ganadores` with as many winners as its file has rows ending in 7574, the server
#      logs `sorteo` once, no log line says `result: fail` or holds a token, and scripts/probe.sh
#      (plain-text PING and STATUS on the TLS port) sees drawn=true and every bet;
#   5. `down`: the server exits 0 and logs its clean shutdown;
#   6. `up` again: the same keys; the server opens the round already drawn, does not draw again,
#      and the agencies get the same winners;
#   7. the server stopped (exit code 0): scripts/probe.sh fails;
#   8. rotation as docs/docker.md says: `down`, the keys volume removed, `up`: new keys are made
#      (`made: true`, another checksum) and the agencies get their winners with them;
#   9. `down -v` and the image removed, always, also on failure or Ctrl-C; on a failure every
#      container's log is saved first, and the temporary directory kept, its path printed;
#  10. scripts/compose-smoke-replicas.sh: docker-compose.replicas.yaml (PostgreSQL, two
#      replicas), one replica killed mid-round.
#
#   scripts/compose-smoke.sh
#
# It runs under its own compose project name and image tag (lottery-smoke-<pid>), so it never
# touches the containers, network, volumes or image of a user's `docker-compose up`. Exits non-zero on any miss.
# Environment: SMOKE_BETS_PER_AGENCY (default 4000), SMOKE_TIMEOUT seconds per wait (default 300).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
agencies=5
bets=${SMOKE_BETS_PER_AGENCY:-4000}
wait_s=${SMOKE_TIMEOUT:-300}
project=lottery-smoke-$$
image=$project:latest
# The compose file and scripts/probe.sh take the image's name from it.
export LOTTERY_IMAGE=$image
work=$(mktemp -d -t lottery-smoke.XXXXXX)
data=$work/data
mkdir -p "$data"

name=compose-smoke
compose_file=$repo/docker-compose.yaml
# On a failure, compose-lib.sh's cleanup calls this before `down -v`; after it, it removes
# $remove_image (its layers kept, as the next run's build cache).
on_failure() {
  [[ -n $(container server) ]] || return 0
  echo "compose-smoke: the containers, and the server's last log lines:" >&2
  docker ps -a --filter "label=com.docker.compose.project=$project" --format '{{.Names}}: {{.Status}}' >&2
  logs server | tail -n 15 >&2
}
remove_image=$image
# shellcheck source=scripts/compose-lib.sh
source "$repo/scripts/compose-lib.sh"

# The keys volume as a tar stream (its files under keys/), copied out of the keys service's
# container, which has exited: no container is started for it (each costs a copy of the image
# with docker's vfs storage driver).
keys_tar() { docker cp "$(container keys):/keys" -; }

# The files the keys volume must hold, in C order.
want_keys="$( (printf '%s\n' agencies.keys ca.pem server.key server.pem; seq -f 'agency-%g.token' 1 "$agencies") \
  | LC_ALL=C sort | tr '\n' ' ')"

# Checks the keys volume holds exactly the round's keys, and prints a checksum of their names and
# contents (a digest of digests: it shows no key).
keys_sum() {
  local sums listing
  # shellcheck disable=SC2016 # tar's --to-command runs it, with TAR_FILENAME set
  sums=$(keys_tar | tar -x --to-command='printf "%s %s\n" "${TAR_FILENAME#keys/}" "$(sha256sum | cut -c 1-64)"' \
    | LC_ALL=C sort) || die "cannot read the keys volume"
  listing=$(cut -d ' ' -f 1 <<<"$sums" | tr '\n' ' ')
  [[ $listing == "$want_keys" ]] || die "the keys volume holds '$listing', not '$want_keys'"
  sha256sum <<<"$sums" | cut -c 1-16
}

# Checks the keys service exited 0 and said it made the keys ($1 = true) or found them (false).
check_keys_made() {
  local cid code line
  cid=$(container keys)
  [[ -n $cid ]] || die "the keys service has no container"
  code=$(docker inspect --format '{{.State.ExitCode}}' "$cid")
  [[ $code == 0 ]] || die "the keys service exited $code: $(logs keys | tail -n 3)"
  line=$(logs keys | grep 'action: keys | result: success' || true)
  grep -q "| made: $1 |" <<<"$line" || die "the keys service should have said made: $1, it said: ${line:-nothing}"
}

# Checks what /app/.secrets holds in a service's running container: "mode uid name;" per entry,
# the directory itself first.
check_secrets() {
  local svc=$1 want=$2 got
  got=$(docker exec "$(container "$svc")" sh -c 'cd /app/.secrets && stat -c "%a %u %n;" . $(ls -A)' | tr -d '\n') \
    || die "cannot list /app/.secrets in $svc"
  [[ $got == "$want" ]] || die "$svc's /app/.secrets holds '$got', not '$want'"
}

# Checks the tokens are distinct and that no container's log holds one. They are read from the
# keys volume into this shell only, never printed.
check_no_token_in_logs() {
  local tokens svc
  tokens=$(keys_tar | tar -xO --wildcards 'keys/agency-*.token') || die "cannot read the tokens"
  [[ $(sort -u <<<"$tokens" | wc -l) == "$agencies" ]] || die "the agencies' tokens are not $agencies distinct ones"
  for svc in keys server $(seq -f 'agency%g' 1 "$agencies"); do
    if in_log "$svc" -F -f <(printf '%s\n' "$tokens"); then die "$svc's log holds an agency's token"; fi
  done
}

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
check_keys_made true
keys=$(keys_sum)
in_log server 'action: listen | result: success | .* | tls: true | agency_keys: true$' \
  || die "part 1: the server did not listen with tls: true | agency_keys: true: $(logs server | grep -m 1 'action: listen')"
check_secrets server "700 10001 .;600 10001 agencies.keys;600 10001 server.key;644 10001 server.pem;"
for ((id = 1; id <= waiting; id++)); do
  check_secrets "agency$id" "700 10001 .;600 10001 agency-$id.token;644 10001 ca.pem;"
done
say "part 1: keys made (checksum $keys); the server listens with TLS and agency keys; each agency holds ca.pem and its own token only (0600, uid 10001)"
down_clean "$agencies"

say "round, part 2: up with every agency; the server resumes the round"
compose up -d >>"$work/compose.log" 2>&1 || die "docker-compose up failed"
check_keys_made false
[[ $(keys_sum) == "$keys" ]] || die "part 2: the keys changed across down/up"
wait_agencies
opened=$(logs server | grep 'action: open_storage' || true)
grep -q "agencies_done: $waiting | drawn: false" <<<"$opened" \
  || die "part 2: the server did not resume the round: ${opened:-no open_storage line}"
check_winners
sorteos=$(logs server | grep -c 'action: sorteo | result: success' || true)
[[ $sorteos == 1 ]] || die "part 2: the server logged sorteo $sorteos times"
for svc in server $(seq -f 'agency%g' 1 "$agencies"); do
  if in_log "$svc" 'result: fail'; then
    die "part 2: $svc logged a fail: $(logs "$svc" | grep -m 1 'result: fail')"
  fi
done
check_no_token_in_logs
probe=$("$repo/scripts/probe.sh" -p "$project") || die "probe failed on the running round: $probe"
grep -qx "STATUS agencies_done=$agencies/$agencies bets=$((agencies * bets)) drawn=true" <<<"$probe" \
  || die "probe: unexpected status: $probe"
say "part 2: the same keys, none made; agencies exited 0 with ${expected[*]} winners, one sorteo, no fail, no token in a log; probe: $(head -n 1 <<<"$probe")"

down_clean 1

say "up again after down, the volume kept"
compose up -d >>"$work/compose.log" 2>&1 || die "second docker-compose up failed"
check_keys_made false
[[ $(keys_sum) == "$keys" ]] || die "again: the keys changed across down/up"
wait_agencies
opened=$(logs server | grep 'action: open_storage' || true)
grep -q "bets: $((agencies * bets)) .*drawn: true" <<<"$opened" \
  || die "again: the server did not find the round drawn: ${opened:-no open_storage line}"
if in_log server 'action: sorteo'; then die "again: the server drew again"; fi
check_winners
say "again: the same keys; the server found the round drawn, drew nothing, agencies got the same winners"

say "probe with the server stopped"
compose stop server >>"$work/compose.log" 2>&1 || die "docker-compose stop server failed"
if probe=$("$repo/scripts/probe.sh" -p "$project"); then die "probe succeeded with the server stopped"; fi
grep -q 'action: probe | result: fail' <<<"$probe" || die "probe did not say fail: $probe"
code=$(docker inspect --format '{{.State.ExitCode}}' "$(container server)")
[[ $code == 0 ]] || die "docker-compose stop: the server exited $code"
say "probe: $probe"

say "rotation: down, the keys volume removed, up"
compose down >>"$work/compose.log" 2>&1 || die "docker-compose down failed"
keys_volume=$(docker volume ls -q --filter "label=com.docker.compose.project=$project" \
  --filter "label=com.docker.compose.volume=keys")
[[ -n $keys_volume ]] || die "rotation: the project has no keys volume"
docker volume rm "$keys_volume" >>"$work/compose.log" 2>&1 || die "rotation: docker volume rm $keys_volume failed"
compose up -d >>"$work/compose.log" 2>&1 || die "docker-compose up after the rotation failed"
check_keys_made true
rotated=$(keys_sum)
[[ $rotated != "$keys" ]] || die "rotation: the keys are the same as before"
wait_agencies
check_winners
say "rotation: $keys_volume removed, new keys made (checksum $rotated), the agencies got the same winners with them"

say "the replicas: docker-compose.replicas.yaml, one replica killed mid-round"
env -u LOTTERY_IMAGE "$repo/scripts/compose-smoke-replicas.sh" || die "scripts/compose-smoke-replicas.sh failed"

say "ok in ${SECONDS}s: build, keys made once and kept, each agency only its token, a TLS round resumed after down, clean downs, the drawn round kept across down/up, probe success and fail, keys rotated, replicas"
