"""``mgpo demo``: two-turn rollouts of the model on synthetic high-resolution images, printed readably."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mgpo_cli.common import add_config_args, load_from_args


def _print_episode(i: int, ep) -> None:  # noqa: ANN001
    g = ep.grounding
    s = ep.sample
    print(f"── episode {i} (prompt {ep.group}) ─────────────────────────────────────────")
    print(
        f"  image     {s.image_path}  original {ep.original_size[0]}x{ep.original_size[1]}"
        f"  → overview {ep.overview_size[0]}x{ep.overview_size[1]}"
    )
    print(f"  question  {s.question}   answer ({s.answer}) {s.choices[ord(s.answer) - 65]}")
    print(f"  turn 1    {ep.turn1_text[:160]!r}{'…' if len(ep.turn1_text) > 160 else ''}")
    box = "none" if g.box is None else "[" + ", ".join(f"{v:.0f}" for v in g.box) + "]"
    print(f"  box       {box}  reason={g.reason}  rule={g.rule or '-'}  crop(original px)={ep.crop_box}")
    print(f"  turn 2    {ep.turn2_text[:160]!r}{'…' if len(ep.turn2_text) > 160 else ''}")
    print(
        f"  tokens    total {ep.length}  prompt {ep.prompt_len}  turn1 {ep.turn_length(1)}  turn2 {ep.turn_length(2)}"
        f"  trained {int(ep.loss_mask.sum())}  images {ep.image_grid_thw.tolist()}  truncated {ep.truncated}"
    )
    print(f"  reward    {ep.reward:.0f}")


def cmd_demo(args: argparse.Namespace) -> int:
    """A two-turn rollout of the model on synthetic high-resolution images, printed readably, plus one loss."""
    import torch

    from mgpo_core.algorithms import LossCoefficients, grpo_advantages, mgpo_loss
    from mgpo_core.data.synthetic import iter_synthetic_samples, synthetic_options
    from mgpo_core.logprobs import collate_episodes, token_logprobs
    from mgpo_core.modeling.loading import load_bundle
    from mgpo_core.modeling.source import model_dir_for
    from mgpo_core.rollout.hf import HFRolloutEngine
    from mgpo_core.training.metrics import logprob_gap

    cfg = load_from_args(args)
    state = Path(cfg.state_dir)
    t0 = time.perf_counter()
    path = model_dir_for(cfg)
    bundle = load_bundle(path, dtype=cfg.model.dtype)
    print(
        f"model     {path} ({sum(p.numel() for p in bundle.model.parameters()) / 1e6:.2f} M parameters, "
        f"loaded in {time.perf_counter() - t0:.1f}s)"
    )
    samples = list(
        iter_synthetic_samples(
            state / "data" / "demo",
            args.prompts,
            split="demo",
            **synthetic_options(cfg),
        )
    )
    engine = HFRolloutEngine.for_bundle(bundle, cfg)
    t1 = time.perf_counter()
    episodes = engine.generate_episodes(samples, n=args.n, seed=cfg.algorithm.seed)
    t_roll = time.perf_counter() - t1
    for i, ep in enumerate(episodes):
        _print_episode(i, ep)
    rewards = torch.tensor([ep.reward for ep in episodes])
    adv = grpo_advantages(rewards, torch.tensor([ep.group for ep in episodes]), eps=cfg.algorithm.adv_eps)
    batch = collate_episodes(episodes, bundle.model, bundle.special.pad)
    logp, ent = token_logprobs(bundle.model, batch, with_entropy=True)
    coefs = LossCoefficients.from_algorithm(cfg.algorithm)
    loss, metrics = mgpo_loss(logp, logp.detach(), logp.detach(), adv, batch.loss_mask, ent, coefs)
    loss.backward()
    gap = logprob_gap(episodes, logp.detach(), batch.loss_mask)
    n_tok = int(sum(ep.turn_length(1) + ep.turn_length(2) for ep in episodes))
    print("── batch ─────────────────────────────────────────────────────────────────")
    print(
        f"  episodes {len(episodes)}  mean reward {rewards.mean():.3f}  valid boxes "
        f"{sum(ep.valid_box for ep in episodes)}/{len(episodes)}  advantages {[round(x, 3) for x in adv.tolist()]}"
    )
    print(f"  loss {loss.item():.4f}  {json.dumps({k: round(v, 5) for k, v in metrics.items()})}")
    print(f"  train-vs-rollout log-prob gap (mean |Δ| over sampled tokens) {gap:.2e}")
    print(f"  rollout {t_roll:.1f}s for {n_tok} generated tokens ({n_tok / max(t_roll, 1e-9):.0f} tokens/s)")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("demo", help="two-turn rollout of the model on synthetic images, printed readably")
    add_config_args(p)
    p.add_argument("--prompts", type=int, default=2, help="number of synthetic prompts")
    p.add_argument("--n", type=int, default=2, help="rollouts per prompt")
    p.set_defaults(func=cmd_demo)
