#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the control-plane tests and
# prints its URL on stdout (everything else goes to stderr):
#
#   export SWITCHYARD_TEST_PG_URL=$(tests/pg.sh)
#   cargo test -p switchyard-control && cargo test --test e2e_control
#   tests/pg.sh stop          # stops the cluster this script started
#
# Installs Debian's `postgresql` package when no initdb/pg_ctl is found
# (needs root or sudo). As root, the cluster runs as the `postgres` user
# (PostgreSQL refuses to run as root).
set -euo pipefail

STATE=${SWITCHYARD_PG_STATE:-/tmp/switchyard-pg}

find_bin() {
  local name=$1 d
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/$name" ]; then echo "$d/$name"; return 0; fi
  done
  return 1
}

as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
  else
    "$@"
  fi
}

if [ "${1:-}" = "stop" ]; then
  if [ -f "$STATE/data/postmaster.pid" ]; then
    as_owner "$(find_bin pg_ctl)" -D "$STATE/data" -m fast stop >&2 || true
  fi
  exit 0
fi

if ! find_bin initdb >/dev/null || ! find_bin pg_ctl >/dev/null; then
  echo "pg.sh: installing postgresql from Debian packages" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi
INITDB=$(find_bin initdb)
PG_CTL=$(find_bin pg_ctl)

# Already running from an earlier call: reuse it.
if [ -f "$STATE/port" ] && as_owner "$PG_CTL" -D "$STATE/data" status >/dev/null 2>&1; then
  echo "postgres://postgres@127.0.0.1:$(cat "$STATE/port")/postgres"
  exit 0
fi

rm -rf "$STATE"
mkdir -p "$STATE"
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir "$STATE" postgres
  chown postgres "$STATE"
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 55432)
echo "$PORT" > "$STATE/port"

as_owner "$INITDB" -D "$STATE/data" -U postgres --auth=trust -E UTF8 >/dev/null
as_owner "$PG_CTL" -D "$STATE/data" -l "$STATE/log" -w \
  -o "-p $PORT -k $STATE -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2

echo "postgres://postgres@127.0.0.1:$PORT/postgres"
