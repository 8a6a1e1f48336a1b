#!/usr/bin/env bash
# The test command: sets up the environment (idempotent), lints, runs the whole test suite.
# Fails when a test fails, when lint fails, and when no test ran (pytest exit code 5).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash infra/setup_env.sh || { echo "test.sh: environment set-up failed" >&2; exit 1; }
# System packages the browser, PostgreSQL and multi-node tests need (chromium, chromium-driver, postgresql,
# openssh-server, pdsh).
if [ -f infra/system_deps.sh ]; then bash infra/system_deps.sh || { echo "test.sh: system packages failed" >&2; exit 1; }; fi
py="${MGPO_VENV:-$root/.venv}/bin/python"
export DS_ACCELERATOR=cpu MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0 MGPO_REQUIRE_ALL=1  # a skip for a missing component fails (tests/conftest.py)
echo "== ruff ==" && "$py" -m ruff check . || exit 1
echo "== pytest ==" && "$py" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit "$rc"
