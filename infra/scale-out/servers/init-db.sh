#!/usr/bin/env bash
# One database and one role per service on the shared PostgreSQL server; run once. docker compose runs it on the
# db service's first start (mounted into /docker-entrypoint-initdb.d). By hand, as the superuser:
#   set -a; . ./.env; set +a; PGHOST=$POSTGRES_HOST PGUSER=postgres PGPASSWORD=$POSTGRES_PASSWORD bash init-db.sh
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?}" "${PREFECT_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v prefect_pw="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
SQL
