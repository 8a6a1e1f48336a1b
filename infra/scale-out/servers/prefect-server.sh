#!/usr/bin/env bash
# The production Prefect server on PostgreSQL (the asyncpg driver ships with Prefect). The scheduler runs inside
# it: cron deployments get their flow runs created here, and workers (process / Docker / Kubernetes pools, see
# ../prefect/) pick them up. Usage: set -a; . ./.env; set +a; bash prefect-server.sh
#
# Secure by default (docs/SECURITY.md): binds 127.0.0.1 unless PREFECT_HOST names an address (TLS through a reverse
# proxy, docs/SCALE_OUT.md), and every API call needs the auth string read from PREFECT_AUTH_STRING_FILE
# (`user:password`; clients and workers set PREFECT_API_AUTH_STRING to the same value). Whoever reaches an
# unauthenticated Prefect API can start flow runs with any parameters and job variables.
# PREFECT_AUTH=off (a trusted, isolated network only) runs without it.
# PREFECT_SERVER_DATABASE_CONNECTION_URL, when set, replaces the PostgreSQL URL built from POSTGRES_HOST /
# PREFECT_DB_PASSWORD (another database; tests/test_security_servers.py runs this script on SQLite).
set -euo pipefail
if [ -z "${PREFECT_SERVER_DATABASE_CONNECTION_URL:-}" ]; then
  : "${POSTGRES_HOST:?}" "${PREFECT_DB_PASSWORD:?}"
  export PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://prefect:${PREFECT_DB_PASSWORD}@${POSTGRES_HOST}:${POSTGRES_PORT:-5432}/prefect"
fi
export PREFECT_SERVER_API_HOST="${PREFECT_HOST:-127.0.0.1}"
export PREFECT_SERVER_API_PORT="${PREFECT_PORT:-4200}"
if [ "${PREFECT_AUTH:-on}" != "off" ]; then
  : "${PREFECT_AUTH_STRING_FILE:?set it to a file (mode 0600) holding user:password, or PREFECT_AUTH=off}"
  PREFECT_SERVER_API_AUTH_STRING="$(cat "${PREFECT_AUTH_STRING_FILE}")"
  export PREFECT_SERVER_API_AUTH_STRING
fi
# The URL the browser's UI calls; without it the UI calls http://<bind host>:<port>/api, unreachable from outside.
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://127.0.0.1:${PREFECT_SERVER_API_PORT}/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec prefect server start --host "${PREFECT_SERVER_API_HOST}" --port "${PREFECT_SERVER_API_PORT}"
