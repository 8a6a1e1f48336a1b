"""One rank of the gradient-accumulation check (tests/test_update_exact.py): run the trainer's own mini-batch update
(``minibatch_update``: collate → engine forward → log-probs → loss with the mini-batch normaliser → backward → step)
under several DeepSpeed set-ups and write every parameter's change and the logged grad norm.

Usage: ``python tests/ga_worker.py DIR`` (one process) or ``torchrun --nproc_per_node=2 tests/ga_worker.py DIR``.
``DIR`` holds ``inputs.pt`` (model dir, episodes, advantages, base overrides, the set-ups to run); results go to
``DIR/result-w<world>-<name>.pt`` (rank 0).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch


def full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.data.detach().float().clone()
        else:
            out[name] = p.data.detach().float().clone()
    return out


def main(out_dir: str) -> int:
    from mgpo_core.config import load_config
    from mgpo_core.modeling.loading import load_bundle, load_model
    from mgpo_core.training.distributed import init_distributed
    from mgpo_core.training.sampler import shard_for_rank
    from mgpo_core.training.trainer import build_engine, build_reference
    from mgpo_core.training.update import UpdateSettings, minibatch_update, reference_logprobs

    d = Path(out_dir)
    spec = torch.load(d / "inputs.pt", weights_only=False)
    dist = init_distributed()
    torch.manual_seed(0)
    bundle = load_bundle(spec["model_dir"])
    episodes, adv = spec["episodes"], spec["adv"]
    groups = sorted({ep.group for ep in episodes})
    mine = set(shard_for_rank(groups, dist.rank, dist.world))  # whole prompt groups per rank, in order
    idx = [i for i, ep in enumerate(episodes) if ep.group in mine]
    my_eps, my_adv = [episodes[i] for i in idx], adv[idx]
    for name, overrides in spec["setups"]:
        if overrides.get("world") not in (None, dist.world):
            continue
        sets = [f"{k}={v}" for k, v in {**spec["base"], **overrides}.items() if k != "world"]
        cfg = load_config("tiny-cpu", sets)
        model = load_model(spec["model_dir"], dtype="float32")
        model.train()
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        engine, _, _ = build_engine(cfg, model, dist.world)
        # The trainer's own reference: under ZeRO-3 sharded over the ranks like the policy; the expected update
        # (test_update_exact) comes from a plain full copy, so a wrong sharded reference shows there.
        ref_model, ref_engine = build_reference(cfg, Path(spec["model_dir"]), torch.device("cpu"), dist.world)
        settings = UpdateSettings.from_config(cfg, bundle.special)
        old, ref = reference_logprobs(engine.module, ref_model, my_eps, settings, torch.device("cpu"))
        metrics = minibatch_update(engine, my_eps, my_adv, old, ref, settings, torch.device("cpu"))
        after = full_params(engine.module)
        if dist.rank == 0:
            torch.save(
                {
                    "delta": {n: after[n] - before[n] for n in before},
                    "grad_norm": metrics["optim/grad_norm"],
                    "gas": engine.gradient_accumulation_steps(),
                    "world": dist.world,
                },
                d / f"result-w{dist.world}-{name}.pt",
            )
        engine.destroy()
        if ref_engine is not None:
            ref_engine.destroy()
        del engine, model, after
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
