# shellcheck shell=bash
# Shared by scripts/compose-smoke.sh and scripts/compose-smoke-replicas.sh: source it, don't run
# it. The caller sets `name` (for its messages), `repo`, `project`, `compose_file`, `work` and
# `data` first; this picks docker-compose or `docker compose`, and on exit (also on failure or
# Ctrl-C) runs `down -v` and removes $work; if something failed, it first shows the end of
# $work/compose.log, saves every container's log into $work/logs/, and keeps $work, saying where.

say() { echo "$name: $*"; }
die() {
  echo "$name: FAIL: $*" >&2
  exit 1
}

if command -v docker-compose >/dev/null; then
  compose_cmd=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  die "neither docker-compose nor docker compose is installed"
fi
compose() { LOTTERY_DATA_DIR=$data "${compose_cmd[@]}" -p "$project" -f "$compose_file" "$@"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((rc != 0)) && [[ -s $work/compose.log ]]; then
    echo "$name: the last lines of $work/compose.log:" >&2
    tail -n 20 "$work/compose.log" >&2
  fi
  if ((rc != 0)) && declare -F on_failure >/dev/null; then on_failure; fi
  if ((rc != 0)); then save_logs; fi
  compose down -v --remove-orphans >>"$work/compose.log" 2>&1 || echo "$name: down -v failed" >&2
  # --no-prune keeps the layers under it: they are the build cache of the next run.
  if [[ -n ${remove_image:-} ]] && docker image inspect "$remove_image" >/dev/null 2>&1; then
    docker rmi --no-prune "$remove_image" >>"$work/compose.log" 2>&1 || echo "$name: docker rmi $remove_image failed" >&2
  fi
  if ((rc == 0)); then
    rm -rf "$work"
  else
    echo "$name: kept for a look: $work (compose.log, logs/<container>.log, the data set)" >&2
  fi
  exit "$rc"
}

# Saves the log of every container of the project (running or not) into $work/logs/, before
# `down -v` removes them.
save_logs() {
  local id svc
  mkdir -p "$work/logs"
  for id in $(docker ps -aq --filter "label=com.docker.compose.project=$project"); do
    svc=$(docker inspect --format '{{.Name}}' "$id")
    docker logs "$id" >"$work/logs/${svc#/}.log" 2>&1 || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The id of a service's container (running or not).
container() {
  docker ps -aq --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$1" | head -n 1
}
logs() { docker logs "$(container "$1")" 2>&1; }
# Whether service $1's log has a line that grep's other arguments match. Not `logs | grep -q`:
# grep -q stops at the first match, docker logs dies of SIGPIPE, and pipefail makes the match
# a failure, so a log long enough would hide what it holds.
in_log() {
  local log
  log=$(logs "$1")
  grep -q "${@:2}" <<<"$log"
}

declare -a expected=()

# Generates the data set into $data with the image's lottery-round, and counts each agency's
# winners (rows whose number is 7574) into expected[1..agencies].
generate_data() {
  docker run --rm --user "$(id -u):$(id -g)" -v "$data:/out" --entrypoint /usr/local/bin/lottery-round "$image" \
    --generate /out --agencies "$agencies" --bets-per-agency "$bets" >>"$work/compose.log" 2>&1 \
    || die "lottery-round --generate failed"
  # The containers run as another user: the files must be readable by anyone.
  chmod a+r "$data"/agency-*.csv
  local id
  for ((id = 1; id <= agencies; id++)); do
    expected[id]=$(awk -F, '{ sub(/\r$/, "") } $NF == "7574" { n++ } END { print n + 0 }' "$data/agency-$id.csv")
  done
  say "expected winners per agency: ${expected[*]}"
}
