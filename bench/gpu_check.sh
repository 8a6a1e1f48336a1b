#!/usr/bin/env bash
# The GPU check, one command under 10 minutes on one GPU (results under ${OUT:-gpu-results}):
#   1. recipe: `mgpo run --preset qwen2.5-vl-7b-8gpu` itself on one GPU: a random model with Qwen2.5-VL-7B's widths
#      and vocabulary (152,064 rows; LAYERS decoder layers, VDEPTH vision blocks so it fits one GPU beside vLLM),
#      bf16, flash-attn or its SDPA fallback (the log says which), ZeRO-3, vLLM colocated with sleep mode, 2 RL
#      steps of 2 mini-batches, a checkpoint per step, selection, export loaded back by vLLM (evaluation), on the
#      published-format data of `mgpo rehearsal prepare`; then bench/recipe_report.py: generated tok/s/GPU and MFU
#      beside the anchors of docs/PERFORMANCE.md;
#   2. rollout throughput, vLLM vs HF (bench/bench_rollout.py --gpu-config);
#   3. the gpu-marked tests (tests/test_gpu.py);
#   4. the trainer's step benchmark with and without shared-prompt packing (bench/gpu_check.py).
# Every stage runs under its own timeout and the script goes on after a failure; the exit code is the number of
# failed stages. Usage: bash bench/gpu_check.sh   (PY=python, STAGE_TIMEOUT=240, RECIPE_TIMEOUT=420)
# Dry run on CPU (stage 1 only, the rehearsal's scale instead of the real widths): DRY=1 bash bench/gpu_check.sh
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

W=${WORKDIR:-/tmp/mgpo-recipe}
recipe() {  # the 7B preset at one GPU's scale (DRY=1: rehearsal-7b on CPU ranks)
  set -e
  rm -rf "$W/state"
  "$PY" -m mgpo_cli rehearsal prepare --dir "$W" --train 32 --per-benchmark 8
  local data="$W/data" model="$W/model" preset=qwen2.5-vl-7b-8gpu
  local extra=(--set deepspeed.num_gpus=1 --set algorithm.total_steps=2 --set algorithm.prompts_per_step=8
    --set algorithm.mini_batch_prompts=4 --set rollout.max_new_tokens_turn1=256 --set rollout.max_new_tokens_turn2=128
    --set rollout.max_response_tokens=2048 --set rollout.max_model_len=4096 --set rollout.gpu_memory_utilization=0.35
    --set checkpoint.every_steps=1 --set checkpoint.select_every=2 --set evaluation.limit=8
    --set evaluation.max_new_tokens=256)
  if [ "${DRY:-0}" = 1 ]; then
    preset=rehearsal-7b; extra=(--set algorithm.total_steps=2 --set checkpoint.every_steps=1 --set evaluation.limit=4)
  else
    model="$W/model7b"
    [ -f "$model/mgpo_like.json" ] || "$PY" -m mgpo_cli build-tiny --like qwen2.5-vl-7b --real-widths \
      --text-layers "${LAYERS:-8}" --vision-depth "${VDEPTH:-8}" --out "$model" --overwrite
  fi
  MGPO_REHEARSAL_DIR="$W" "$PY" -m mgpo_cli run --preset "$preset" --input "$data/mme_realworld/MME-RealWorld.json" \
    --set state_dir="$W/state" --set model.path="$model" \
    --set "evaluation.data_paths={vstar: $data/vstar, hrbench_4k: $data/hr_bench_4k.tsv, hrbench_8k: $data/hr_bench_8k.tsv, mme_realworld_lite: $data/mme_realworld/MME-RealWorld-Lite.json}" \
    "${extra[@]}"
  "$PY" bench/recipe_report.py --state "$W/state" --model "$model" --json "$OUT/recipe.json"
}
export -f recipe; export W PY OUT
T_SAVE=$T; T=${RECIPE_TIMEOUT:-420}
stage recipe bash -c recipe
T=$T_SAVE
[ "${DRY:-0}" = 1 ] && exit $fails

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
