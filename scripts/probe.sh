#!/usr/bin/env bash
# Checks the lottery server of a running docker-compose project from inside its network: no port
# is published and nothing is installed on the host. A throw-away container of the project's own
# image (it has netcat) joins the compose network and sends PING, STATUS and QUIT to server:12345.
#
#   scripts/probe.sh [-p PROJECT]
#
# PROJECT is the compose project name: -p, else $COMPOSE_PROJECT_NAME, else the name compose
# gives it by default (the repository directory's name, lower-cased, other characters dropped).
# Prints the server's STATUS line and `action: probe | result: success` (exit 0), or
# `action: probe | result: fail | error: <why>` (exit 1).
# Environment: LOTTERY_IMAGE (default lottery:latest), PROBE_TIMEOUT seconds (default 5).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
project=${COMPOSE_PROJECT_NAME:-}
while getopts 'p:h' opt; do
  case $opt in
    p) project=$OPTARG ;;
    h) sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "usage: $0 [-p PROJECT]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 0 ]] || { echo "usage: $0 [-p PROJECT]" >&2; exit 2; }
if [[ -z $project ]]; then
  project=$(basename "$repo" | tr '[:upper:]' '[:lower:]' | tr -cd 'a-z0-9_-')
fi
image=${LOTTERY_IMAGE:-lottery:latest}
wait_s=${PROBE_TIMEOUT:-5}
server=server:12345

fail() {
  # One line, as the logs have it: no `|` inside a value.
  echo "action: probe | result: fail | project: $project | error: ${*//|//}"
  exit 1
}

command -v docker >/dev/null || fail "docker is not installed"
docker info >/dev/null 2>&1 || fail "the docker engine does not answer"
docker image inspect "$image" >/dev/null 2>&1 || fail "no image $image (run docker-compose build)"

# The project's network, by the labels compose puts on it (its name differs between versions).
mapfile -t networks < <(docker network ls -q \
  --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.network=lottery")
[[ ${#networks[@]} -eq 1 ]] || fail "no compose network 'lottery' for project $project (is it up? try -p)"

errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
# -w: gives up on a connection or a silence that long; QUIT makes the server close, so nc ends.
# -v: nc says why it could not connect (without it, a refused connection is silent); its line
# on success goes to $errors too, which is shown only on failure.
if ! replies=$(printf 'PING\nSTATUS\nQUIT\n' | timeout $((wait_s + 15)) docker run --rm -i \
    --network "${networks[0]}" --entrypoint /usr/bin/nc "$image" -v -w "$wait_s" "${server%:*}" "${server#*:}" \
    2>"$errors"); then
  why=$(tr -s '\n' ' ' <"$errors")
  why=${why% }
  fail "cannot reach $server: ${why:-no answer}"
fi
replies=${replies//$'\r'/}
pong=$(sed -n 1p <<<"$replies")
status=$(sed -n 2p <<<"$replies")
[[ $pong == PONG ]] || fail "PING got '${pong:-nothing}' from $server, not PONG"
[[ $status =~ ^STATUS\ agencies_done=[0-9]+/[0-9]+\ bets=[0-9]+\ drawn=(true|false)$ ]] \
  || fail "STATUS got '${status:-nothing}' from $server"
echo "$status"
echo "action: probe | result: success | project: $project | server: $server"
