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

# SECURITY=tls (the default: TLS and agency tokens, from keys that BIN/lottery-server makes with
# --make-keys into KEYS_DIR for AGENCIES agencies) or SECURITY=plain (no TLS, no tokens: the
# server in protected mode). Exports the server's and the agencies' settings for it.
security_setup() {
  local bin=$1 keys=$2 agencies=$3
  case ${SECURITY:-tls} in
    tls)
      SERVER_AGENCIES=$agencies "$bin/lottery-server" --make-keys "$keys" >/dev/null
      export SERVER_AGENCY_KEYS=$keys/agencies.keys SERVER_TLS_CERT=$keys/server.pem SERVER_TLS_KEY=$keys/server.key
      export CLI_TLS_CA=$keys/ca.pem CLI_TOKEN_FILE="$keys/agency-{CLI_ID}.token"
      ;;
    plain)
      export SERVER_AGENCY_KEYS='' SERVER_TLS_CERT='' SERVER_TLS_KEY='' CLI_TLS_CA='' CLI_TOKEN_FILE=''
      ;;
    *) echo "SECURITY is tls or plain, not '$SECURITY'" >&2; return 2 ;;
  esac
}

# Prints how many agency-N.csv files DATA_DIR holds; fails if none.
count_agencies() {
  local n
  n=$(find "$1" -maxdepth 1 -name 'agency-*.csv' | wc -l)
  [[ $n -gt 0 ]] || { echo "no agency-N.csv in $1" >&2; return 1; }
  echo "$n"
}
