#!/usr/bin/env bash
# The production MLflow server: runs, metrics and the model registry in PostgreSQL, artifacts in object storage,
# proxied by the server (--serve-artifacts): clients (trainer ranks, Prefect workers, the browser) talk HTTP only
# and need no bucket credentials. Needs `pip install mlflow==3.17.2 psycopg2-binary boto3` on the server host.
# Usage: set -a; . ./.env; set +a; bash mlflow-server.sh
set -euo pipefail
: "${POSTGRES_HOST:?}" "${MLFLOW_DB_PASSWORD:?}" "${MLFLOW_ARTIFACTS_DESTINATION:?}"
export MLFLOW_DISABLE_TELEMETRY=true
# The GenAI job runner forks consumer processes this pipeline never uses.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "postgresql://mlflow:${MLFLOW_DB_PASSWORD}@${POSTGRES_HOST}:${POSTGRES_PORT:-5432}/mlflow" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}" --serve-artifacts \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost:*,127.0.0.1:*}" \
  --workers "${MLFLOW_WORKERS:-4}"
