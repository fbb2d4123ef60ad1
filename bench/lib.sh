# shellcheck shell=bash
# Shared by the bench scripts: source it, don't run it.

# Prints the port a server logging to LOG listens on, once its `action: listen` line is there;
# fails with the log after 10 s.
server_port() {
  local log=$1 port
  for _ in $(seq 100); do
    # The server's shell may not have created the log yet.
    port=$(sed -n 's/.*action: listen | result: success | address: [0-9.]*:\([0-9]*\).*/\1/p' "$log" 2>/dev/null)
    [[ -n $port ]] && { echo "$port"; return; }
    sleep 0.1
  done
  echo "the server did not start; its log:" >&2
  cat "$log" >&2
  return 1
}
