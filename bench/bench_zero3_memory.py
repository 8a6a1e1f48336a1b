"""Per-rank memory of the policy, the frozen reference model and the optimizer states under ZeRO-3, measured.

Usage: ``DS_ACCELERATOR=cpu .venv/bin/python bench/bench_zero3_memory.py [--world 2] [--json out.json]``.

Starts ``--world`` CPU ranks (gloo), builds the trainer's own DeepSpeed engine (``trainer.build_engine``, ZeRO-3,
AdamW) and reference model (``trainer.build_reference``) on a checkpoint laid out as Qwen2.5-VL-7B-Instruct
(``build-tiny --like``: the real 152,064-row vocabulary, small widths), once with the reference sharded
(``deepspeed.zero_stage=3``: what the trainer does now) and once as the full copy it held before. Each rank
counts the bytes it really holds: its ZeRO-3 partition of every parameter (``ds_tensor``) or the whole tensor,
and every optimizer state tensor. The 7B row scales the measured bytes per parameter to Qwen2.5-VL-7B's exact
parameter count (the published config instantiated on the meta device), bf16 weights as the recipe trains.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _held_bytes(module) -> int:  # noqa: ANN001
    total = 0
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)
        total += (t if t is not None else p).numel() * p.element_size()
    return total


def _optimizer_bytes(optimizer) -> int:  # noqa: ANN001
    import torch

    seen, total = set(), 0
    opt = getattr(optimizer, "optimizer", optimizer)
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    for group in getattr(optimizer, "fp32_partitioned_groups_flat", []) or []:
        total += group.numel() * group.element_size()
    return total


def _rank(rank: int, world: int, model_dir: str, port: int, out: str, sharded: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")  # fmt: skip
    import torch

    from mgpo_core.config import load_config
    from mgpo_core.modeling.loading import load_model
    from mgpo_core.training.distributed import init_distributed
    from mgpo_core.training.trainer import build_engine, build_reference

    dist = init_distributed()
    cfg = load_config("rehearsal-7b", [f"model.path={model_dir}", f"deepspeed.num_gpus={world}",
                                       f"algorithm.mini_batch_prompts={world}"])  # fmt: skip
    policy = load_model(model_dir, dtype=cfg.model.dtype)
    engine, optimizer, _ = build_engine(cfg, policy, dist.world)
    # Take a step so AdamW's moments exist (they are created lazily).
    engine.train()
    ids = torch.tensor([[151644, 872, 198, 151645]])
    loss = engine.module(input_ids=ids).logits.float().mean()
    engine.backward(loss)
    engine.step()
    if sharded:
        ref, _ = build_reference(cfg, Path(model_dir), torch.device("cpu"), dist.world)
    else:
        ref = load_model(model_dir, dtype=cfg.model.dtype).requires_grad_(False)
    row = {"rank": rank, "policy": _held_bytes(engine.module), "reference": _held_bytes(ref),
           "optimizer": _optimizer_bytes(optimizer), "params": sum(p.ds_numel if hasattr(p, "ds_numel") else
                                                                   p.numel() for p in engine.module.parameters())}  # fmt: skip
    Path(out, f"{'sharded' if sharded else 'full'}-rank{rank}.json").write_text(json.dumps(row))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def seven_b_parameters() -> int:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from mgpo_core.modeling.like import QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION

    cfg = Qwen2_5_VLConfig(text_config={**QWEN25_VL_7B_TEXT, "vocab_size": 152_064},
                           vision_config=QWEN25_VL_7B_VISION, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch.multiprocessing as mp

    from mgpo_core.modeling.base import base_model_for
    from mgpo_core.modeling.like import like_model_dir
    from mgpo_core.training.launch import free_port

    work = Path(tempfile.mkdtemp(prefix="zero3mem-"))
    model = like_model_dir(work / "models", base_model_for(work / "models", seed=0))
    results: dict[str, list[dict]] = {}
    for sharded in (True, False):
        mp.spawn(_rank, args=(args.world, str(model), free_port(), str(work), sharded), nprocs=args.world, join=True)
        results["sharded" if sharded else "full"] = [
            json.loads((work / f"{'sharded' if sharded else 'full'}-rank{r}.json").read_text())
            for r in range(args.world)
        ]
    n_small = results["sharded"][0]["params"]
    n7b = seven_b_parameters()
    gib = 2**30
    print(f"measured on {args.world} CPU ranks, {n_small / 1e6:.1f} M parameters (fp32 weights); 7B: {n7b / 1e9:.2f} B")
    print("| reference | rank | policy | reference | optimizer | total | 7B-scaled (bf16 weights) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for kind, ranks in results.items():
        for r in ranks:
            # Scale bytes per parameter to the 7B count; weights in bf16 there (half the fp32 bytes measured here).
            pol7 = r["policy"] / n_small * n7b / 2
            ref7 = r["reference"] / n_small * n7b / 2
            opt7 = r["optimizer"] / n_small * n7b  # fp32 master + moments stay fp32
            total = r["policy"] + r["reference"] + r["optimizer"]
            rows.append({**r, "kind": kind, "policy_7b": pol7, "reference_7b": ref7, "optimizer_7b": opt7})
            print(f"| {kind} | {r['rank']} | {r['policy'] / gib:.3f} GiB | {r['reference'] / gib:.3f} GiB | "
                  f"{r['optimizer'] / gib:.3f} GiB | {total / gib:.3f} GiB | policy {pol7 / gib:.1f} + reference "
                  f"{ref7 / gib:.1f} + optimizer {opt7 / gib:.1f} = {(pol7 + ref7 + opt7) / gib:.1f} GiB |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"world": args.world, "params": n_small, "params_7b": n7b,
                                               "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
