#!/usr/bin/env bash
# The main job: sets up the environment (idempotent) and runs `mgpo run` on the embedded default
# (tiny offline Qwen2.5-VL, synthetic high-resolution data). Extra arguments go to `mgpo run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash infra/setup_env.sh
export DS_ACCELERATOR=cpu MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${MGPO_VENV:-$root/.venv}/bin/mgpo" run "$@"
