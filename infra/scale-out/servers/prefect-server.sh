#!/usr/bin/env bash
# The production Prefect server on PostgreSQL (the asyncpg driver ships with Prefect). The scheduler runs inside
# it: cron deployments get their flow runs created here, and workers (process / Docker / Kubernetes pools, see
# ../prefect/) pick them up. Usage: set -a; . ./.env; set +a; bash prefect-server.sh
set -euo pipefail
: "${POSTGRES_HOST:?}" "${PREFECT_DB_PASSWORD:?}"
export PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://prefect:${PREFECT_DB_PASSWORD}@${POSTGRES_HOST}:${POSTGRES_PORT:-5432}/prefect"
export PREFECT_SERVER_API_HOST="${PREFECT_HOST:-0.0.0.0}"
export PREFECT_SERVER_API_PORT="${PREFECT_PORT:-4200}"
# The URL the browser's UI calls; without it the UI calls http://<bind host>:<port>/api, unreachable from outside.
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://127.0.0.1:${PREFECT_SERVER_API_PORT}/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec prefect server start --host "${PREFECT_SERVER_API_HOST}" --port "${PREFECT_SERVER_API_PORT}"
