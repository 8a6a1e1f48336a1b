"""The update is the one the algorithm defines (METHOD.md §2b), through the trainer's own code path.

One optimiser step over k micro-batches, under ZeRO-2 and ZeRO-3, on one and two ranks, with and without CPU
offload, must change every parameter exactly as one plain-torch pass over the whole mini-batch does (token-mean
over all of its loss tokens, gradient clipped by the WHOLE mini-batch's norm), and the logged grad norm must be
that mini-batch's. Plain SGD (no momentum, no weight decay) makes the update ``-lr * clipped gradient``, so the
weights show the gradient itself; the clip threshold is set below the measured norm so clipping is active.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgpo_core.config import load_config
from mgpo_core.training.launch import free_port

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("ga_worker.py")
BASE = {
    "rollout.min_pixels": 3136,
    "rollout.max_pixels": 12544,
    "rollout.engine": "hf",
    "rollout.n": 2,
    "rollout.max_new_tokens_turn1": 6,
    "rollout.max_new_tokens_turn2": 4,
    "algorithm.prompts_per_step": 4,
    "algorithm.mini_batch_prompts": 4,
    "algorithm.kl_coef": 0.01,
    "algorithm.entropy_coef": 0.001,
    "optimizer.name": "sgd",
    "optimizer.weight_decay": 0.0,
    "optimizer.lr": 1.0,
}
# (name, overrides): 8 episodes per mini-batch in micro-batches of 2: k = 4 accumulation steps on one rank, 2 on
# each of two ranks. The reference is one plain-torch pass over all 8, so k = 1 needs no run of its own.
SETUPS = [
    (
        f"z{stage}{'-offload' if off else ''}-mb{mb}-w{world}",
        {
            "deepspeed.zero_stage": stage,
            "deepspeed.offload_optimizer": off,
            "deepspeed.offload_params": off and stage == 3,
            "algorithm.micro_batch_size": mb,
            "world": world,
        },
    )
    for world, mbs in ((1, (2,)), (2, (2,)))
    for stage in (2, 3)
    for off in (False, True)
    for mb in mbs
]
# Every set-up above packs each micro-batch's shared prompt (algorithm.shared_prompt, the default: a micro-batch of
# 2 is one prompt's 2 rollouts); one runs the padded batch through DeepSpeed as well.
SETUPS.append(("z3-mb2-w1-unpacked", {"deepspeed.zero_stage": 3, "algorithm.micro_batch_size": 2, "world": 1,
                                      "algorithm.shared_prompt": False}))


@pytest.fixture(scope="module")
def mini_batch(tiny_dir, tiny_bundle, synthetic_samples, tmp_path_factory):
    """Eight two-turn episodes (4 prompts × 2) from the HF engine, with advantages of both signs."""
    from mgpo_core.algorithms import grpo_advantages
    from mgpo_core.rollout.hf import HFRolloutEngine

    cfg = load_config("tiny-cpu", [f"{k}={v}" for k, v in BASE.items()])
    b = tiny_bundle
    eng = HFRolloutEngine.for_bundle(b, cfg)
    samples = (synthetic_samples * 2)[:4]
    episodes = eng.generate_episodes(samples, n=2, seed=11)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    adv = grpo_advantages(rewards, torch.tensor([ep.group for ep in episodes]))
    assert (adv != 0).all()
    return cfg, episodes, adv


def _plain_torch_update(tiny_dir, special, cfg, episodes, adv):  # noqa: ANN001, ANN202
    """-lr * clip(grad) of ONE pass over the whole mini-batch, without DeepSpeed: the definition."""
    from mgpo_core.algorithms import mgpo_loss
    from mgpo_core.modeling.loading import load_model
    from mgpo_core.training.update import UpdateSettings, reference_logprobs

    model = load_model(tiny_dir, dtype="float32")
    model.train()
    ref = load_model(tiny_dir, dtype="float32").requires_grad_(False).eval()
    # The padded batch, each prompt run once per rollout (no shared-prompt packing): the set-ups below pack.
    whole = UpdateSettings.from_config(cfg, special)
    whole = dataclasses.replace(whole, micro_batch_size=len(episodes), share_prompt=False)
    old, ref_lp = reference_logprobs(model, ref, episodes, whole, torch.device("cpu"))
    batch = whole.collate(episodes, model, torch.device("cpu"), torch.float32)
    logp, ent = whole.logprobs(model, batch, with_entropy=True)
    loss, _ = mgpo_loss(logp, old[0], ref_lp[0], adv, batch.loss_mask, ent, whole.coefs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    return grads, norm


def _run_worker(d: Path, nproc: int) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(d)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            str(WORKER),
            str(d),
        ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]


def test_accumulated_update_equals_one_pass_over_the_whole_mini_batch(
    tiny_dir, tiny_bundle, mini_batch, tmp_path
):
    cfg, episodes, adv = mini_batch
    grads, norm = _plain_torch_update(tiny_dir, tiny_bundle.special, cfg, episodes, adv)
    clip = norm / 4  # clipping active: the update is the direction of the whole mini-batch's gradient
    lr = BASE["optimizer.lr"]
    expected = {n: -lr * g * min(1.0, clip / (norm + 1e-6)) for n, g in grads.items()}
    scale = max(float(e.abs().max()) for e in expected.values())
    torch.save(
        {
            "model_dir": str(tiny_dir),
            "episodes": episodes,
            "adv": adv,
            "base": {**BASE, "optimizer.grad_clip": clip},
            "setups": SETUPS,
        },
        tmp_path / "inputs.pt",
    )
    _run_worker(tmp_path, 1)
    _run_worker(tmp_path, 2)
    results = {}
    for name, overrides in SETUPS:
        r = torch.load(tmp_path / f"result-w{overrides['world']}-{name}.pt", weights_only=False)
        assert r["gas"] == len(episodes) // overrides["world"] // overrides["algorithm.micro_batch_size"] > 1
        untouched = [n for n, dlt in r["delta"].items() if n not in expected and dlt.abs().max() > 0]
        assert not untouched, f"{name}: parameters without gradient moved: {untouched[:3]}"
        err = max(float((r["delta"][n] - e).abs().max()) for n, e in expected.items())
        results[name] = (err / scale, abs(r["grad_norm"] - norm) / norm)
    print(
        f"reference grad norm {norm:.6f}, clip {clip:.6f}; per set-up (max |Δθ − Δθ_ref| / max |Δθ_ref|, "
        "|grad norm − ref| / ref):",
        {k: f"{a:.1e}, {b:.1e}" for k, (a, b) in results.items()},
    )
    bad = {k: v for k, v in results.items() if v[0] > 1e-4 or v[1] > 1e-5}
    assert not bad, f"update or logged grad norm differs from one pass over the whole mini-batch: {bad}"
