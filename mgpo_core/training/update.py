"""One PPO update over a step's mini-batches: micro-batches ordered for packing, old/reference log-probs, the
MGPO loss with gradient accumulation, and its metrics (the update tests compare with the full-batch gradient)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mgpo_core.algorithms import LossCoefficients, mgpo_loss
from mgpo_core.config import MGPOConfig
from mgpo_core.episodes import Episode, train_mask
from mgpo_core.logprobs import collate_episodes, token_logprobs
from mgpo_core.training.distributed import all_reduce_sum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateSettings:
    """What one PPO update needs besides the tensors: loss weights, micro-batch size and how log-probs are taken."""

    coefs: LossCoefficients
    micro_batch_size: int
    pad_id: int
    temperature: float = 1.0
    """The rollout's sampling temperature: every log-prob of the update is of softmax(logits / T)."""
    suppress_ids: tuple[int, ...] = ()
    """Ids the rollout engines never sample (vision placeholders, padded rows): excluded from the distribution."""
    train_forced: bool = False
    """Whether tokens the environment forced (no behaviour log-prob) enter the loss."""
    bucket_by_length: bool = True
    """Sort each mini-batch share by length before cutting it into micro-batches (:func:`micro_batch_order`)."""
    share_prompt: bool = False
    """Run each prompt that episodes of a micro-batch share once (:mod:`mgpo_core.packing`); micro-batches then
    keep a prompt's episodes together (:func:`micro_batch_order`)."""

    @classmethod
    def from_config(cls, cfg: MGPOConfig, special) -> UpdateSettings:  # noqa: ANN001 - SpecialTokens
        a = cfg.algorithm
        return cls(
            coefs=LossCoefficients.from_algorithm(a),
            micro_batch_size=a.micro_batch_size,
            pad_id=special.pad,
            temperature=cfg.rollout.temperature,
            suppress_ids=tuple(special.non_text_ids()),
            train_forced=a.train_forced_tokens,
            share_prompt=a.shared_prompt,
        )

    def collate(self, episodes: Sequence[Episode], model, device: torch.device, dtype: torch.dtype):  # noqa: ANN001, ANN201
        return collate_episodes(
            episodes, model, self.pad_id, train_forced=self.train_forced, share_prompt=self.share_prompt
        ).to(device, dtype)

    def logprobs(self, model, batch, *, with_entropy: bool = False):  # noqa: ANN001, ANN201
        return token_logprobs(
            model,
            batch,
            with_entropy=with_entropy,
            temperature=self.temperature,
            suppress_ids=self.suppress_ids,
        )


def engine_logprobs(engine, batch, settings: UpdateSettings, *, with_entropy: bool):  # noqa: ANN001, ANN201
    """The policy's log-probs of ``batch`` computed as ONE forward of the DeepSpeed engine (``engine(...)``).

    DeepSpeed's micro-step contract is ``engine(...)`` → ``engine.backward(loss)`` → ``engine.step()``: its
    forward starts the ZeRO optimiser's micro-step (ZeRO-3 advances ``micro_step_id``, so the next backward
    ADDS to the gradient partitions instead of overwriting them; ZeRO-1/2 clear the previous micro-step's
    accumulation state) and registers the output hooks that run the backward prologue (gradient-accumulation
    boundary flag, ZeRO's backward entry). Calling the module directly skips all of it: under ZeRO-3 every
    micro-batch's gradient then replaced the previous one's. The engine's forward calls ``engine.module(...)``,
    so for this one call the module's forward is our log-prob function (an instance attribute shadowing the
    class's ``forward``; removed again right after).
    """
    module = engine.module

    def forward(b):  # noqa: ANN001, ANN202
        return settings.logprobs(module, b, with_entropy=with_entropy)

    module.forward = forward
    try:
        return engine(batch)
    finally:
        del module.forward


def micro_batch_order(episodes: Sequence[Episode], settings: UpdateSettings) -> list[int]:
    """The order in which one rank's share of a mini-batch is cut into micro-batches of ``micro_batch_size``.

    Longest first (stable), so each micro-batch holds episodes of similar length and a short episode is not padded
    to the longest one of the share (and the first micro-batch already reaches the peak memory). With
    ``settings.share_prompt`` the unit is a prompt's group instead of an episode (groups by their packed length,
    longest first; inside a group longest first), so a micro-batch runs each prompt once for all its rollouts.
    Exact: every micro-batch's loss is a sum over its tokens divided by the WHOLE mini-batch's normaliser, so the
    accumulated gradient does not depend on how the episodes are grouped (only the float summation order changes).
    ``settings.bucket_by_length=False`` keeps the rollout order.
    """
    idx = list(range(len(episodes)))
    if not settings.bucket_by_length:
        return idx
    if not settings.share_prompt:
        return sorted(idx, key=lambda i: -episodes[i].length)
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(episodes[i].group, []).append(i)
    members = [sorted(g, key=lambda i: -episodes[i].length) for g in groups.values()]

    def packed_length(g: list[int]) -> int:
        p = min(episodes[i].prompt_len for i in g)
        return p + sum(episodes[i].length - p for i in g)

    members.sort(key=lambda g: -packed_length(g))
    return [i for g in members for i in g]


def forward_tokens(minis: Sequence[tuple[Sequence[Episode], Any]], settings: UpdateSettings) -> int:
    """Tokens one forward over the step's micro-batches runs: with ``settings.share_prompt`` each micro-batch runs
    the prompt its episodes share once (:func:`mgpo_core.packing.packed_tokens`), else every episode token."""
    from mgpo_core.packing import packed_tokens

    mb, total = settings.micro_batch_size, 0
    for eps, _ in minis:
        for k in range(0, len(eps), mb):
            chunk = eps[k : k + mb]
            total += packed_tokens(chunk) if settings.share_prompt else sum(ep.length for ep in chunk)
    return total


def _gap_sums(episodes: Sequence[Episode], logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum and count of |trainer log-prob − rollout log-prob| over the sampled loss tokens of a micro-batch."""
    total, count = 0.0, 0
    for i, ep in enumerate(episodes):
        lp = ep.rollout_logprobs
        sel = torch.isfinite(lp) & (mask[i, : ep.length] > 0)
        total += float((logp[i, : ep.length][sel].float() - lp[sel]).abs().sum())
        count += int(sel.sum())
    return total, count


def minibatch_update(
    engine,  # noqa: ANN001
    episodes: Sequence[Episode],
    adv: torch.Tensor,
    old_logp: Sequence[torch.Tensor | None] | None,
    ref_logp: Sequence[torch.Tensor | None] | None,
    settings: UpdateSettings,
    device: torch.device,
    *,
    with_gap: bool = False,
    ref_model: torch.nn.Module | None = None,
    record: dict[str, list[torch.Tensor | None]] | None = None,
) -> dict[str, float]:
    """One optimiser step over one rank's share of a mini-batch, accumulated over its micro-batches.

    ``old_logp``/``ref_logp`` hold one tensor per micro-batch of ``episodes`` (chunks of ``micro_batch_size``, in
    the given order).

    *On-policy* (``old_logp`` None, or an entry None): the policy has not been updated since the rollout (the
    first mini-batch of an RL step's first PPO epoch), so the old log-probs ARE this forward's log-probs,
    detached: the ratio is exactly 1, the clip inactive, the gradient the plain policy gradient, and no separate
    old-log-prob pass is needed. *Fused reference*: with ``ref_logp`` None (or an entry None) and a ``ref_model``,
    the reference log-probs are computed here, on the same collated micro-batch (no grad), just before the
    policy's forward; its activations are freed before the policy's, so the peak memory is the update's.
    ``record`` (a dict) receives the old and reference log-probs used, one tensor per micro-batch (for later PPO
    epochs over the same mini-batch).
    Every micro-batch's loss is divided by the mini-batch's loss-token count over all ranks divided by the world
    size; DeepSpeed averages gradients over ranks and does not rescale by the accumulation steps
    (``scale_wrt_gas=False``), so the accumulated gradient is that of the token-mean over the whole mini-batch,
    and the clipping and the grad norm DeepSpeed applies at the boundary are the whole mini-batch's.

    Returns the mini-batch's ``loss/*`` (summed over micro-batches), the mean ``actor/*`` over micro-batches,
    ``optim/grad_norm`` (before clipping) and, with ``with_gap``, ``rollout/logprob_gap``.
    """
    mb = settings.micro_batch_size
    chunks = [episodes[i : i + mb] for i in range(0, len(episodes), mb)]
    gas = engine.gradient_accumulation_steps()
    if len(chunks) != gas or (old_logp is not None and len(old_logp) != gas):
        raise RuntimeError(
            f"a mini-batch share of {len(episodes)} episodes makes {len(chunks)} micro-batches of {mb}, but the "
            f"DeepSpeed engine accumulates {gas}: the optimiser step would not cover exactly one mini-batch"
        )
    if engine.micro_steps % gas:
        raise RuntimeError(
            f"DeepSpeed is {engine.micro_steps % gas} micro-steps into an accumulation window at the start of a "
            "mini-batch; every engine(...)/backward/step must belong to a whole mini-batch"
        )
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    dtype = next(engine.module.parameters()).dtype
    masks = [train_mask(ep, settings.train_forced) for ep in episodes]
    local_tokens = float(sum(float(m.sum()) for m in masks))
    normalizer = max(all_reduce_sum(local_tokens, device) / world, 1.0)
    with_entropy = settings.coefs.entropy_coef > 0
    sums: dict[str, float] = {}
    gap_sum, gap_count = 0.0, 0
    steps_before = engine.global_steps
    for k, chunk in enumerate(chunks):
        batch = settings.collate(chunk, engine.module, device, dtype)
        ref_k = None if ref_logp is None else ref_logp[k]
        if ref_k is None and ref_model is not None:
            with torch.no_grad():
                ref_k = settings.logprobs(ref_model, batch)[0].float()
        logp, ent = engine_logprobs(engine, batch, settings, with_entropy=with_entropy)
        logp = logp.float()
        old_k = None if old_logp is None else old_logp[k]
        old_k = logp.detach() if old_k is None else old_k.to(device)
        if record is not None:
            record.setdefault("old", []).append(old_k)
            record.setdefault("ref", []).append(ref_k)
        start = k * mb
        loss, metrics = mgpo_loss(
            logp,
            old_k,
            None if ref_k is None else ref_k.to(device),
            adv[start : start + len(chunk)].to(device),
            batch.loss_mask,
            ent,
            settings.coefs,
            normalizer=normalizer,
        )
        if k == gas - 1 and not engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "the last micro-batch of a mini-batch is not DeepSpeed's accumulation boundary"
            )
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        if with_gap:
            g_sum, g_count = _gap_sums(chunk, old_k.cpu(), batch.loss_mask.cpu())
            gap_sum, gap_count = gap_sum + g_sum, gap_count + g_count
        for key, v in metrics.items():
            sums[key] = sums.get(key, 0.0) + v
    if engine.global_steps != steps_before + 1:
        raise RuntimeError(
            f"DeepSpeed took {engine.global_steps - steps_before} optimiser steps for one mini-batch (expected 1)"
        )
    out = {k: (v if k.startswith("loss/") else v / len(chunks)) for k, v in sums.items()}
    gn = engine.get_global_grad_norm()
    if gn is not None:
        out["optim/grad_norm"] = float(gn)
    if with_gap:  # token-mean over the share's sampled loss tokens (independent of the micro-batch grouping)
        out["rollout/logprob_gap"] = gap_sum / gap_count if gap_count else 0.0
    return out


@torch.no_grad()
def reference_logprobs(
    policy, ref_model, episodes: Sequence[Episode], settings: UpdateSettings, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Old (``policy`` before the update) and reference log-probs, one tensor per micro-batch, same distribution
    (temperature, suppressed ids) as the update's."""
    mb = settings.micro_batch_size
    dtype = next(policy.parameters()).dtype
    old, ref = [], []
    was_training = policy.training
    policy.eval()
    try:
        for i in range(0, len(episodes), mb):
            batch = settings.collate(episodes[i : i + mb], policy, device, dtype)
            old.append(settings.logprobs(policy, batch)[0].float())
            ref.append(settings.logprobs(ref_model, batch)[0].float() if ref_model is not None else None)
    finally:
        policy.train(was_training)
    return old, ref
