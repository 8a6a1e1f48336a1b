#!/usr/bin/env bash
# The production MLflow server: runs, metrics and the model registry in PostgreSQL, artifacts in object storage,
# proxied by the server (--serve-artifacts): clients (trainer ranks, Prefect workers, the browser) talk HTTP only
# and need no bucket credentials. Needs `pip install "mlflow[auth]==3.17.2" psycopg2-binary boto3` on the server host.
# Usage: set -a; . ./.env; set +a; bash mlflow-server.sh
#
# Secure by default (docs/SECURITY.md): binds 127.0.0.1 unless MLFLOW_HOST names an address (put TLS in front with
# a reverse proxy, docs/SCALE_OUT.md); runs MLflow's basic-auth app (every request needs a user; the admin's
# password is read from MLFLOW_ADMIN_PASSWORD_FILE, never from the command line); the database password reaches
# MLflow through the environment (MLFLOW_BACKEND_STORE_URI), not argv, so `ps` does not show it.
# MLFLOW_AUTH=off (a trusted, isolated network only) runs without authentication.
# MLFLOW_BACKEND_STORE_URI, when set, replaces the PostgreSQL URI built from POSTGRES_HOST / MLFLOW_DB_PASSWORD
# (another database; tests/test_security_servers.py runs this script on SQLite).
set -euo pipefail
: "${MLFLOW_ARTIFACTS_DESTINATION:?}"
export MLFLOW_DISABLE_TELEMETRY=true
# The GenAI job runner forks consumer processes this pipeline never uses.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
  : "${POSTGRES_HOST:?}" "${MLFLOW_DB_PASSWORD:?}"
  export MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:${MLFLOW_DB_PASSWORD}@${POSTGRES_HOST}:${POSTGRES_PORT:-5432}/mlflow"
fi
auth=()
if [ "${MLFLOW_AUTH:-on}" != "off" ]; then
  : "${MLFLOW_ADMIN_PASSWORD_FILE:?set it to a file (mode 0600) holding the admin password, or MLFLOW_AUTH=off}"
  umask 077
  conf="$(mktemp -d)/basic_auth.ini"
  # MLflow's auth app reads its users database and the first admin from this file (MLFLOW_AUTH_CONFIG_PATH).
  {
    echo "[mlflow]"
    echo "default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
    echo "database_uri = ${MLFLOW_AUTH_DATABASE_URI:-${MLFLOW_BACKEND_STORE_URI}}"
    echo "admin_username = ${MLFLOW_ADMIN_USER:-admin}"
    echo "admin_password = $(cat "${MLFLOW_ADMIN_PASSWORD_FILE}")"
    echo "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
  } > "$conf"
  export MLFLOW_AUTH_CONFIG_PATH="$conf"
  # The auth app signs its CSRF tokens with this key and refuses to start without it. Several server processes
  # behind one address must share it (MLFLOW_FLASK_SECRET_KEY_FILE); one server may draw a fresh one per start.
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    if [ -n "${MLFLOW_FLASK_SECRET_KEY_FILE:-}" ]; then
      MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "${MLFLOW_FLASK_SECRET_KEY_FILE}")"
    else
      MLFLOW_FLASK_SERVER_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_hex(32))')"
    fi
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  auth=(--app-name basic-auth)
fi
exec mlflow server "${auth[@]}" \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}" --serve-artifacts \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost:*,127.0.0.1:*}" \
  --workers "${MLFLOW_WORKERS:-4}"
