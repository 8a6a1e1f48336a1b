#!/usr/bin/env bash
# ISSUE 11's GPU checks in one run of a few minutes (one GPU; results under ${OUT:-gpu-results}):
#   1. rollout throughput, vLLM vs HF, 7B-shaped random Qwen2.5-VL in bf16 (bench/bench_rollout.py --gpu-config);
#   2. a short ZeRO-3 bf16 MGPO training of the same shapes with vLLM colocated, sleep mode on
#      (bench/gpu_check.py: generated tokens/s/GPU, step time, MFU, peak GPU memory);
#   3. the gpu-marked tests (tests/test_gpu.py: shared-prompt packing on the CUDA attention kernels);
#   4. stage 2 again with algorithm.shared_prompt=false (the padded batch), for the packing A/B.
# Every stage runs under its own timeout and the script goes on after a failure; the exit code is the number of
# failed stages. Usage: bash bench/gpu_check.sh   (PY=python, STAGE_TIMEOUT=240 by default)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PY:-python}
T=${STAGE_TIMEOUT:-240}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MLFLOW_DISABLE_TELEMETRY=true
fails=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, vllm, deepspeed, transformers; print(torch.__version__, vllm.__version__, deepspeed.__version__, transformers.__version__, torch.cuda.get_device_name())" > "$OUT/versions.txt" 2>&1 || true

stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  timeout "$T" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ "$name" = tests ] && [ $rc -eq 5 ]; then rc=0; fi
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  [ $rc -eq 0 ] || fails=$((fails + 1))
}

stage rollout "$PY" bench/bench_rollout.py --gpu-config --samples 16 --n 8 --max-new-tokens 256 128 --repeats 2 \
  --sync-repeats 3 --workdir /tmp/mgpo-gpu-rollout --json "$OUT/rollout-gpu.json"
stage train "$PY" bench/gpu_check.py --steps 2 --warmup 1 --prompts 8 --n 8 --max-new-tokens 256 128 \
  --workdir /tmp/mgpo-gpu-check --json "$OUT/train-gpu.json"
stage tests "$PY" -m pytest -m gpu -q tests
# A/B of shared-prompt packing (the train stage packs, the default): the same run with the padded batch, last so a
# short budget loses only this comparison.
stage train-unpacked "$PY" bench/gpu_check.py --steps 2 --warmup 1 --prompts 8 --n 8 --max-new-tokens 256 128 \
  --workdir /tmp/mgpo-gpu-check --json "$OUT/train-gpu-unpacked.json" --set algorithm.shared_prompt=false
exit $fails
