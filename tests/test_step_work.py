"""Less work per RL step, same update (ISSUE 11; METHOD.md §2b).

- **On-policy first mini-batch, no old-log-prob pass:** before the RL step's first optimiser step the old policy IS
  the current one, so the update forward's detached log-probs are the old log-probs (ratio 1, clip inactive). The
  parameter change, the logged grad norm, the loss parts and the train-vs-rollout gap must equal the two-pass path
  (separate no-grad old + reference passes, then the update), bit for bit.
- **Fused reference pass:** the reference log-probs computed inside the update's micro-batch loop are the ones
  the separate pass computes.
- **Length-bucketed micro-batches:** sorting a mini-batch share by length before cutting it into micro-batches
  changes only the float summation order (the token-mean's normaliser is the whole mini-batch's), so the update
  matches the rollout-order path to fp32 precision, with less padding.
- **The trainer's step** (several mini-batches, two PPO epochs) runs the same way.

Each update is one real DeepSpeed ZeRO-2 optimiser step (fp32, one process) through ``minibatch_update``; plain
SGD with clipping active makes the parameter change ``-lr · clip(grad)``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mgpo_core.config import load_config

pytestmark = pytest.mark.slow

BASE = [
    "rollout.min_pixels=3136",
    "rollout.max_pixels=12544",
    "rollout.engine=hf",
    "rollout.n=2",
    "rollout.max_new_tokens_turn1=8",
    "rollout.max_new_tokens_turn2=4",
    "rollout.temperature=0.7",
    "algorithm.prompts_per_step=4",
    "algorithm.mini_batch_prompts=4",
    "algorithm.micro_batch_size=2",
    "algorithm.kl_coef=0.05",
    "algorithm.entropy_coef=0.001",
    "deepspeed.zero_stage=2",
    "deepspeed.bf16=false",
    "model.dtype=float32",
    "optimizer.name=sgd",
    "optimizer.weight_decay=0.0",
    "optimizer.lr=1.0",
    "optimizer.grad_clip=0.05",
]


@pytest.fixture(scope="module")
def mini_batch(tiny_bundle, synthetic_samples):
    """Eight two-turn episodes (4 prompts × 2) of different lengths from the HF engine; advantages of both signs."""
    from mgpo_core.algorithms import grpo_advantages
    from mgpo_core.rollout.hf import HFRolloutEngine

    cfg = load_config("tiny-cpu", BASE)
    b = tiny_bundle
    eng = HFRolloutEngine.for_bundle(b, cfg)
    episodes = eng.generate_episodes((synthetic_samples * 2)[:4], n=2, seed=5)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    adv = grpo_advantages(rewards, torch.tensor([ep.group for ep in episodes]))
    assert (adv != 0).all()
    assert len({ep.length for ep in episodes}) > 1, "need episodes of different lengths"
    return cfg, episodes, adv


def _update(tiny_dir, special, cfg, episodes, adv, *, path: str, bucket: bool, share: bool = True):  # noqa: ANN001, ANN202
    """One ZeRO-2 optimiser step over the 8 episodes (4 micro-batches of 2) along ``path``; returns
    (parameter change, metrics, padded tokens). ``share``: shared-prompt packing (tests/test_packing.py)."""
    from mgpo_core.modeling.loading import load_model
    from mgpo_core.training.distributed import init_distributed
    from mgpo_core.training.trainer import build_engine
    from mgpo_core.training.update import (
        UpdateSettings,
        micro_batch_order,
        minibatch_update,
        reference_logprobs,
    )

    dist = init_distributed()
    assert dist.world == 1
    torch.manual_seed(0)
    model = load_model(tiny_dir, dtype="float32")
    model.train()
    ref = load_model(tiny_dir, dtype="float32").requires_grad_(False).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _, _ = build_engine(cfg, model, 1)
    settings = dataclasses.replace(
        UpdateSettings.from_config(cfg, special), bucket_by_length=bucket, share_prompt=share
    )
    order = micro_batch_order(episodes, settings)
    eps, a = [episodes[i] for i in order], adv[order]
    mb = settings.micro_batch_size
    padded = sum(len(eps[i : i + mb]) * max(e.length for e in eps[i : i + mb]) for i in range(0, len(eps), mb))
    cpu = torch.device("cpu")
    if path == "two-pass":
        old, ref_lp = reference_logprobs(engine.module, ref, eps, settings, cpu)
        m = minibatch_update(engine, eps, a, old, ref_lp, settings, cpu, with_gap=True)
    elif path == "on-policy":
        m = minibatch_update(engine, eps, a, None, None, settings, cpu, with_gap=True, ref_model=ref)
    else:
        raise ValueError(path)
    delta = {n: p.detach() - before[n] for n, p in engine.module.named_parameters()}
    engine.destroy()
    return delta, m, padded


def test_on_policy_update_without_old_pass_equals_the_two_pass_update(tiny_dir, tiny_bundle, mini_batch):
    cfg, episodes, adv = mini_batch
    d2, m2, _ = _update(tiny_dir, tiny_bundle.special, cfg, episodes, adv, path="two-pass", bucket=False)
    d1, m1, _ = _update(tiny_dir, tiny_bundle.special, cfg, episodes, adv, path="on-policy", bucket=False)
    assert max(float(d.abs().max()) for d in d2.values()) > 0
    not_equal = [n for n in d2 if not torch.equal(d1[n], d2[n])]
    assert not not_equal, f"parameter updates differ: {not_equal[:5]}"
    assert m1 == m2, {k: (m1.get(k), m2.get(k)) for k in set(m1) | set(m2) if m1.get(k) != m2.get(k)}
    assert m2["rollout/logprob_gap"] < 1e-3  # the engine's log-probs of the tempered distribution
    assert m2["optim/grad_norm"] > cfg.optimizer.grad_clip  # clipping was active
    assert m2["loss/kl"] == 0.0 or m2["loss/kl"] < 1e-9  # the policy is the reference before the step


def test_length_bucketed_micro_batches_give_the_same_update_with_less_padding(tiny_dir, tiny_bundle, mini_batch):
    cfg, episodes, adv = mini_batch
    # Rollout order with the longest and the shortest episodes paired in micro-batches (groups of one prompt have
    # similar lengths and would already sit together).
    by_len = sorted(range(len(episodes)), key=lambda i: episodes[i].length)
    mixed = [i for pair in zip(by_len[:4], by_len[::-1][:4], strict=True) for i in pair]
    episodes, adv = [episodes[i] for i in mixed], adv[mixed]
    # Bucketing alone (packing off): sorting by length pairs the longest episodes with each other.
    sp = tiny_bundle.special
    d0, m0, pad0 = _update(tiny_dir, sp, cfg, episodes, adv, path="two-pass", bucket=False, share=False)
    d1, m1, pad1 = _update(tiny_dir, sp, cfg, episodes, adv, path="on-policy", bucket=True, share=False)
    assert pad1 < pad0, (pad1, pad0)
    scale = max(float(d.abs().max()) for d in d0.values())
    err = max(float((d1[n] - d0[n]).abs().max()) for n in d0)
    print(f"padded tokens {pad0} -> {pad1}; max |Δθ_bucketed − Δθ| / max |Δθ| = {err / scale:.1e}")
    assert err / scale < 1e-5
    for key in ("optim/grad_norm", "loss/policy", "loss/total", "rollout/logprob_gap"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-9), key


def test_trainer_step_with_several_mini_batches_and_two_epochs(tmp_path, tiny_dir, synthetic_samples):
    """The trainer's own step: mini-batch 1 on-policy, mini-batch 2 from the old pass, epoch 2 reuses both."""
    from mgpo_core.training.trainer import MGPOTrainer

    cfg = load_config(
        "tiny-cpu",
        [
            *BASE,
            f"model.path={tiny_dir}",
            f"state_dir={tmp_path}",
            "tracking.mlflow_tracking_uri=http://127.0.0.1:9",
            "algorithm.mini_batch_prompts=2",
            "algorithm.ppo_epochs=2",
            "algorithm.total_steps=1",
            "optimizer.name=adamw",
            "optimizer.lr=1e-3",
            "checkpoint.export_hf=false",
        ],
    )
    trainer = MGPOTrainer(cfg, tmp_path / "run", (synthetic_samples * 2)[:4], progress=False)
    calls = []
    inner = trainer._old_logprobs

    def spy(minis):  # noqa: ANN001, ANN202
        out = inner(minis)
        calls.append([None if o is None else len(o) for o in out])
        return out

    trainer._old_logprobs = spy
    steps_before = trainer.engine.global_steps
    m = trainer.train_step()
    assert calls == [[None, 2]]  # 2 mini-batches of 4 episodes: only the second needs an old pass
    assert trainer.engine.global_steps == steps_before + 4  # 2 epochs × 2 mini-batches
    assert m["rollout/logprob_gap"] < 1e-3
    assert m["actor/approx_kl"] >= 0.0 and torch.isfinite(torch.tensor(m["loss/total"]))


def test_vision_tower_once_per_distinct_image_gives_the_same_logprobs_and_gradients(tiny_dir, mini_batch):
    from mgpo_core.logprobs import collate_episodes, distinct_images, token_logprobs
    from mgpo_core.modeling.loading import load_model

    cfg, episodes, _ = mini_batch
    model = load_model(tiny_dir, dtype="float32")
    model.train()
    batch = collate_episodes(episodes, model, pad_id=0)
    first, where = distinct_images(batch.pixel_values, batch.image_grid_thw)
    assert len(first) < len(where) == 2 * len(episodes)  # the n rollouts of a prompt share its overview
    results = []
    for dedupe in (True, False):
        model.zero_grad()
        logp, ent = token_logprobs(model, batch, with_entropy=True, temperature=0.7, dedupe_images=dedupe)
        (logp.sum() + ent.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), grads))
    (lp1, g1), (lp0, g0) = results
    print(f"{len(where)} images, {len(first)} distinct; max |Δ logp| {float((lp1 - lp0).abs().max()):.1e}")
    assert torch.allclose(lp1, lp0, atol=1e-5, rtol=0)
    assert g1.keys() == g0.keys() and any(n.startswith("model.visual") for n in g1)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], atol=1e-5 * float(g0[n].abs().max()) + 1e-8, rtol=1e-4), n
