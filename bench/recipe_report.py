"""Throughput and MFU of a recipe run (`mgpo run`), read from its training run's ``metrics.jsonl``.

Usage: ``python bench/recipe_report.py --state STATE_DIR --model MODEL_DIR [--peak-tflops 989] [--json out.json]``.
Per RL step: generated tokens/s/GPU (the trainer's ``perf/generated_tokens_per_s``, one rank's rollout), step
time and its phases, and MFU = model FLOPs / (step time x peak bf16 FLOP/s), with model FLOPs counted as
2·N per token of a forward pass (rollout decode, old and reference log-probs) and 6·N per trained token (forward
+ backward), N = the model's parameters (from its weight index). Attention FLOPs are left out, as verl's and
EasyR1's estimators also do at these lengths. The anchors it prints are docs/PERFORMANCE.md's: EasyR1
single-turn 7B 1,600-2,000 generated tok/s/GPU on 8xH100; multi-turn peers 375-600.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ANCHORS = {"EasyR1 single-turn 7B (8xH100)": (1600, 2000), "multi-turn peers": (375, 600)}


def step_report(m: dict, params: int, peak: float) -> dict:
    gen_rate = m.get("perf/generated_tokens_per_s", 0.0)
    generated = gen_rate * m.get("timing/rollout_s", 0.0)
    fwd = m.get("perf/forward_tokens", 0.0)
    passes = 2 if m.get("timing/old_ref_logprobs_s", 0.0) > 0 else 0  # old + reference log-prob passes
    flops = 2 * params * generated + 2 * params * fwd * passes + 6 * params * fwd
    step_s = m.get("timing/step_s", 0.0)
    return {
        "step": m.get("step"),
        "generated_tokens_per_s_per_gpu": gen_rate,
        "step_s": step_s,
        "rollout_s": m.get("timing/rollout_s"),
        "update_s": m.get("timing/update_s"),
        "weight_sync_s": m.get("timing/weight_sync_s"),
        "mfu": flops / (step_s * peak) if step_s and peak else None,
        "peak_gpu_mem_gb": m.get("perf/peak_gpu_mem_gb") or m.get("perf/peak_gpu_memory_gb"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", required=True, help="the run's state_dir")
    p.add_argument("--model", required=True, help="the model directory (parameter count)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200: 989)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from mgpo_core.ops.preflight import model_parameters

    params = model_parameters(args.model) or 0
    runs = sorted(Path(args.state, "runs").glob("*/metrics.jsonl"), key=lambda f: f.stat().st_mtime)
    if not runs:
        print(f"no training run under {args.state}/runs", file=sys.stderr)
        return 1
    rows = []
    for line in runs[-1].read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            rows.append({"step": rec.get("step"), **rec.get("metrics", rec)})
    steps = [step_report(m, params, args.peak_tflops * 1e12) for m in rows if "timing/step_s" in m]
    print(f"run {runs[-1].parent.name}: {params / 1e9:.2f} B parameters")
    print("| step | gen tok/s/GPU | step s | rollout s | update s | sync s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for s in steps:
        mfu = f"{100 * s['mfu']:.1f} %" if s["mfu"] is not None else "-"
        print(f"| {s['step']} | {s['generated_tokens_per_s_per_gpu']:.0f} | {s['step_s']:.1f} | {s['rollout_s']:.1f} "
              f"| {s['update_s']:.1f} | {s['weight_sync_s']:.1f} | {mfu} |")  # fmt: skip
    for name, (lo, hi) in ANCHORS.items():
        print(f"anchor: {name}: {lo}-{hi} generated tok/s/GPU")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "steps": steps, "anchors": ANCHORS}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
