"""The RL math of MGPO as pure tensor functions: group advantages, KL estimators, the clipped policy loss, entropy.

Every function takes and returns plain tensors, holds no state and never touches a model or a process group, so the
trainer, the tests and any benchmark call the same code. Shapes: ``B`` = trajectories (prompts × rollouts),
``T`` = response tokens (both assistant turns, padded), ``V`` = vocabulary. The token ``mask`` (B, T) is 1 on the
tokens the model generated in either assistant turn and 0 on prompt, inserted user turn, image and padding tokens
(METHOD.md §2). Estimators and losses are registered by name so a config can pick them with a string.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "LossCoefficients",
    "Registry",
    "UnknownNameError",
    "broadcast_advantages",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "mgpo_loss",
    "ppo_clip_loss",
]

F = TypeVar("F", bound=Callable[..., object])

# exp(±20) ≈ 4.9e8 stays finite in fp32/bf16 and its gradient too; a larger log-ratio only arises from a broken
# token alignment or a stale engine and must not turn the whole batch into inf/NaN.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------------------------------
# Registry


class UnknownNameError(KeyError):
    """A registry lookup with a name that was never registered (message lists the known names)."""

    def __str__(self) -> str:
        # KeyError's default str() wraps the message in quotes; the message is a sentence, show it as one.
        return str(self.args[0]) if self.args else super().__str__()


class Registry(Generic[F]):
    """Name → function table for one kind of component (advantage estimator, KL estimator, policy loss).

    ``kind`` is only used in error messages, so they say what was being looked up.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding ``fn`` under ``name``; refuses a name that is already taken (silent override hides bugs)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: F) -> F:
            if name in self._entries:
                previous = self._entries[name]
                where = (
                    f"{getattr(previous, '__module__', '?')}.{getattr(previous, '__qualname__', previous)}"
                )
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {where}); register yours under another name"
                )
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The function registered under ``name``; the error lists every known name."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries)) or '(none)'}. "
                f"Fix the name in the config or register a new one with @<REGISTRY>.register({name!r})"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


ADVANTAGE_ESTIMATORS: Registry[Callable[..., Tensor]] = Registry("advantage estimator")
KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")
POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, dict[str, Tensor]]]] = Registry("policy loss")


# --------------------------------------------------------------------------------------------------------------------
# Masked reductions


def _check_same_shape(where: str, **tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"{where}: shapes must match, got {listed}; pad/slice them to the same (B, T)")


def _masked_values(x: Tensor, mask: Tensor, where: str) -> Tensor:
    """``x * mask`` where the mask is non-zero and an exact 0 elsewhere.

    ``torch.where`` instead of a bare product because masked positions (padding, image tokens) may hold inf or NaN
    log-probs, and ``NaN * 0`` is NaN; the gradient reaching ``x`` at those positions is exactly 0.
    """
    _check_same_shape(where, x=x, mask=mask)
    weights = mask.to(x.dtype)
    return torch.where(mask != 0, x * weights, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is non-zero.

    Args:
        x: (B, T) values (any shape, in fact, as long as ``mask`` has the same).
        mask: same shape as ``x``, bool or 0/1 float (fractional weights are honoured as weights).
        dim: reduce over these dims; ``None`` sums everything to a scalar.
    """
    values = _masked_values(x, mask, "masked_sum")
    return values.sum() if dim is None else values.sum(dim=dim)


def masked_mean(
    x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-8
) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero; 0 (not NaN) where nothing is unmasked.

    The denominator is ``max(mask.sum(dim), eps)`` rather than ``mask.sum() + eps`` so that the mean over a
    non-empty mask is exact, while an empty mask gives 0/eps = 0.
    """
    total = masked_sum(x, mask, dim)
    weights = mask.to(x.dtype)
    count = weights.sum() if dim is None else weights.sum(dim=dim)
    return total / count.clamp_min(eps)


# --------------------------------------------------------------------------------------------------------------------
# Advantages


def _group_index(group_ids: Tensor | Sequence[Hashable], batch: int, device: torch.device) -> Tensor:
    """Dense group index (B,) int64 in [0, G) from integer ids or arbitrary hashables (e.g. prompt uids)."""
    if isinstance(group_ids, Tensor):
        if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
            raise TypeError(
                f"grpo_advantages: group_ids has dtype {group_ids.dtype}; pass an integer tensor (B,) or a "
                "sequence of hashable ids (e.g. the prompt uid of each trajectory)"
            )
        ids = group_ids.to(device=device, dtype=torch.int64)
    else:
        first_seen: dict[Hashable, int] = {}
        try:
            dense = [first_seen.setdefault(g, len(first_seen)) for g in _as_iterable(group_ids)]
        except TypeError as err:
            raise TypeError(f"grpo_advantages: every group id must be hashable ({err})") from None
        ids = torch.tensor(dense, dtype=torch.int64, device=device)
    if ids.dim() != 1 or ids.numel() != batch:
        raise ValueError(
            f"grpo_advantages: group_ids must hold one id per trajectory, shape ({batch},); got shape "
            f"{tuple(ids.shape)}"
        )
    return torch.unique(ids, return_inverse=True)[1]


def _as_iterable(group_ids: Sequence[Hashable]) -> Iterable[Hashable]:
    if isinstance(group_ids, str | bytes):
        raise TypeError("group_ids is a single string; pass one id per trajectory (a list)")
    return group_ids


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    *,
    eps: float = 1e-6,
    normalize_std: bool = True,
) -> Tensor:
    """Group-relative advantage of each trajectory: ``(r − mean_group) / (std_group + eps)``.

    Args:
        rewards: (B,) scalar outcome reward per trajectory (binary in MGPO).
        group_ids: (B,) which prompt each trajectory was sampled from — an integer tensor or any sequence of
            hashables. Groups need not be contiguous nor of equal size.
        eps: added to the std so near-constant groups do not blow up.
        normalize_std: ``False`` gives the mean-centred variant (Dr. GRPO), no division by the std.

    Returns:
        (B,) advantages, in the floating dtype of ``rewards`` (float32 for integer rewards), no grad.

    The std is the unbiased (Bessel) one, as in the reference. Two deliberate choices:
    a group of size 1 gets A = 0 (it has no baseline to compare against — verl instead returns r/(1+eps)), and a
    group whose rewards are all equal gets exactly 0 even when the float mean is not exact (e.g. three 0.1s).
    Statistics are accumulated in float64 with ``index_add_``: one pass, no Python loop over samples.
    """
    if rewards.dim() != 1:
        raise ValueError(f"grpo_advantages: rewards must be (B,), got shape {tuple(rewards.shape)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.detach().to(torch.float64)
    bad = (~torch.isfinite(r)).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"grpo_advantages: rewards must be finite; non-finite at indices {bad[:8].tolist()}"
            " — fix the reward function (a failed score should be 0, not NaN)"
        )
    index = _group_index(group_ids, r.numel(), r.device)
    if r.numel() == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)
    n_groups = int(index.max()) + 1

    counts = torch.bincount(index, minlength=n_groups).to(torch.float64)
    sums = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, index, r)
    centred = r - (sums / counts)[index]
    adv = centred
    if normalize_std:
        sq = torch.zeros_like(sums).index_add_(0, index, centred * centred)
        std = (sq / (counts - 1).clamp_min(1)).sqrt()
        adv = centred / (std[index] + eps)

    # Exact zeros for degenerate groups: all rewards equal (no signal), which includes a singleton (no baseline).
    # Tested on max == min, not on std == 0, because a float mean of equal values can be off by an ulp.
    g_max = torch.full_like(sums, -math.inf).scatter_reduce_(0, index, r, "amax", include_self=False)
    g_min = torch.full_like(sums, math.inf).scatter_reduce_(0, index, r, "amin", include_self=False)
    degenerate = g_max == g_min
    adv = torch.where(degenerate[index], torch.zeros_like(adv), adv)
    return adv.to(out_dtype)


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token advantages (B, T) = trajectory advantage (B,) on every loss token, 0 elsewhere."""
    if advantages.dim() != 1 or mask.dim() != 2 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"broadcast_advantages: need advantages (B,) and mask (B, T); got {tuple(advantages.shape)} and "
            f"{tuple(mask.shape)}"
        )
    return advantages[:, None] * mask.to(advantages.dtype)


def _token_advantages(advantages: Tensor, like: Tensor, where: str) -> Tensor:
    """Accept (B,) or (B, T) advantages; return (B, T) (a view, no copy, for the (B,) case)."""
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        return advantages[:, None].expand_as(like)
    if advantages.shape == like.shape:
        return advantages
    raise ValueError(
        f"{where}: advantages must be (B,)={like.shape[0]} or (B, T)={tuple(like.shape)}, got "
        f"{tuple(advantages.shape)}"
    )


# --------------------------------------------------------------------------------------------------------------------
# KL estimators (Schulman's k1/k2/k3 of KL(π_θ ‖ π_ref), tokens sampled from π_θ)


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp − ref (B, T): unbiased, high variance, can be negative per token."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (logp − ref)² (B, T): biased, low variance, ≥ 0; its gradient matches the true KL's to first order."""
    return 0.5 * (logp - ref_logp).square()


@KL_ESTIMATORS.register("low_var_kl")
def kl_low_var(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref − logp) − (ref − logp) − 1 (B, T): unbiased and ≥ 0 (unclamped; see :func:`kl_penalty`).

    The log-ratio is clamped to ±LOG_RATIO_CLAMP before ``exp`` because an overflowed exp makes the backward pass
    multiply 0 by inf even where the output clamp zeroes the gradient.
    """
    log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS.register("k3")(kl_low_var)


def kl_penalty(
    logp: Tensor, ref_logp: Tensor, kind: str = "low_var_kl", clamp: float | None = 10.0
) -> Tensor:
    """Per-token KL estimate (B, T) of the policy against the frozen reference model.

    Args:
        logp, ref_logp: (B, T) log-probs of the sampled tokens under the policy and the reference.
        kind: a name in ``KL_ESTIMATORS`` (``k1``, ``k2``, ``low_var_kl`` alias ``k3``).
        clamp: bound for ``low_var_kl``/``k3`` only (result clamped to [−clamp, clamp], reference value 10); its
            exponential term is the one that explodes when the reference is far more confident than the policy.
            k1/k2 are returned unclamped. ``None`` disables the bound.
    """
    _check_same_shape("kl_penalty", logp=logp, ref_logp=ref_logp)
    estimator = KL_ESTIMATORS.get(kind)
    kl = estimator(logp, ref_logp)
    if clamp is not None and estimator is kl_low_var:
        if clamp <= 0:
            raise ValueError(f"kl_penalty: clamp must be > 0 or None, got {clamp}")
        kl = kl.clamp(-clamp, clamp)
    return kl


# --------------------------------------------------------------------------------------------------------------------
# Policy loss


def _normalizer_tensor(normalizer: float | Tensor | None, mask: Tensor, like: Tensor, where: str) -> Tensor:
    """Denominator of a token-mean: the number of loss tokens unless the caller supplies the mini-batch total."""
    if normalizer is None:
        return mask.to(like.dtype).sum().clamp_min(1e-8)
    if isinstance(normalizer, Tensor):
        # No .item(): that would force a device sync on every micro-batch.
        return normalizer.to(device=like.device, dtype=like.dtype).clamp_min(1e-8)
    if not math.isfinite(normalizer) or normalizer < 0:
        raise ValueError(
            f"{where}: normalizer must be a finite count ≥ 0 (the mini-batch's total loss tokens), got {normalizer}"
        )
    return torch.tensor(max(float(normalizer), 1e-8), dtype=like.dtype, device=like.device)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, token-mean over the loss mask.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the policy being trained (requires grad).
        old_logp: (B, T) the same under the policy that generated the batch (recomputed before the update).
        advantages: (B,) per trajectory or (B, T) per token.
        mask: (B, T) loss mask (bool or 0/1 float).
        clip_low, clip_high: the ratio is clipped to [1 − clip_low, 1 + clip_high] (symmetric 0.2 in MGPO;
            a larger ``clip_high`` gives DAPO's clip-higher).
        normalizer: denominator of the token-mean; default ``mask.sum()``. Under gradient accumulation pass the
            whole mini-batch's token count to every micro-batch, so the micro-batch losses (and gradients) sum to
            the token-mean of the whole mini-batch instead of a mean of per-micro-batch means.

    Returns:
        ``(loss, metrics)``: scalar ``sum(per_token_loss · mask) / normalizer``, and detached scalar metrics over
        this call's mask: ``clip_frac`` (share of loss tokens where the clipped branch is the one taken),
        ``approx_kl`` (mean of k3 of KL(π_old ‖ π_θ): ``(ratio − 1) − log ratio``, ≥ 0 and unbiased because the tokens
        were sampled from π_old), ``ratio_mean``.

    Per token: ``max(−A·ratio, −A·clip(ratio))``, the pessimistic of the two surrogates; ``ratio`` is
    ``exp(logp − old_logp)`` with the log-ratio clamped to ±LOG_RATIO_CLAMP so a misaligned token cannot give inf.
    """
    _check_same_shape("ppo_clip_loss", logp=logp, old_logp=old_logp, mask=mask)
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(
            f"ppo_clip_loss: need 0 ≤ clip_low < 1 and clip_high ≥ 0, got clip_low={clip_low}, clip_high={clip_high}"
        )
    adv = _token_advantages(advantages, logp, "ppo_clip_loss").to(logp.dtype)
    denom = _normalizer_tensor(normalizer, mask, logp, "ppo_clip_loss")

    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_sum(per_token, mask) / denom

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------------
# Entropy


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy of the next-token distribution at every position: (B, T, V) logits → (B, T).

    ``H = logsumexp(z) − Σ softmax(z)·z``, which needs no log of a tiny probability. Computed in at least float32
    (bf16 softmax sums are too coarse for a bonus with coefficient 1e-3). Logits at −inf (masked vocabulary ids)
    contribute 0 instead of ``0 · −inf = NaN``. ``chunk_size`` processes that many positions of T at a time so the
    (B, chunk, V) float32 temporaries, not (B, T, V), bound the peak memory; the result is the same.
    """
    if logits.dim() != 3:
        raise ValueError(f"entropy_from_logits: logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"entropy_from_logits: chunk_size must be a positive int or None, got {chunk_size}")
    work_dtype = torch.promote_types(logits.dtype, torch.float32)

    def chunk_entropy(z: Tensor) -> Tensor:
        z = z.to(work_dtype)
        probs = torch.softmax(z, dim=-1)
        finite_z = torch.where(torch.isneginf(z), torch.zeros((), dtype=z.dtype, device=z.device), z)
        return torch.logsumexp(z, dim=-1) - (probs * finite_z).sum(dim=-1)

    steps = logits.shape[1] if chunk_size is None else chunk_size
    if steps >= logits.shape[1]:
        return chunk_entropy(logits)
    return torch.cat([chunk_entropy(part) for part in logits.split(steps, dim=1)], dim=1)


# --------------------------------------------------------------------------------------------------------------------
# The MGPO loss


@dataclass
class LossCoefficients:
    """Weights and knobs of the MGPO actor loss (METHOD.md §2 defaults)."""

    kl_coef: float = 0.01
    """Weight of the KL-to-reference loss term (a loss term, not reward shaping); 0 disables it."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus (subtracted from the loss); 0 disables it."""
    clip_low: float = 0.2
    """Lower clip ε: ratios below 1 − clip_low are clipped. Must be in [0, 1)."""
    clip_high: float = 0.2
    """Upper clip ε: ratios above 1 + clip_high are clipped. Must be ≥ 0."""
    kl_estimator: str = "low_var_kl"
    """Name in ``KL_ESTIMATORS``: ``k1``, ``k2``, ``low_var_kl`` (= ``k3``)."""
    kl_clamp: float = 10.0
    """Per-token bound on the ``low_var_kl`` estimate."""

    @classmethod
    def from_algorithm(cls, a) -> LossCoefficients:  # noqa: ANN001 - the config's AlgorithmConfig
        """The coefficients of a config's ``algorithm`` section."""
        return cls(
            kl_coef=a.kl_coef,
            entropy_coef=a.entropy_coef,
            clip_low=a.clip_low,
            clip_high=a.clip_high,
            kl_estimator=a.kl_estimator,
            kl_clamp=a.kl_clamp,
        )

    def __post_init__(self) -> None:
        for name in ("kl_coef", "entropy_coef", "clip_high", "kl_clamp"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"LossCoefficients.{name} must be a finite number ≥ 0, got {value}")
        if not 0 <= self.clip_low < 1:
            raise ValueError(
                f"LossCoefficients.clip_low must be in [0, 1) (the ratio is clipped at 1 − clip_low), "
                f"got {self.clip_low}"
            )
        if self.kl_clamp == 0:
            raise ValueError("LossCoefficients.kl_clamp must be > 0 (10 in the reference)")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"LossCoefficients.kl_estimator {self.kl_estimator!r} is unknown; "
                f"choose one of {', '.join(KL_ESTIMATORS.names())}"
            )


def mgpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    entropy: Tensor | None,
    coefs: LossCoefficients,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Actor loss of one (micro-)batch: ``policy − entropy_coef·entropy + kl_coef·kl``.

    Args:
        logp, old_logp: (B, T) as in :func:`ppo_clip_loss`.
        ref_logp: (B, T) log-probs under the frozen initial model, or ``None`` (then no KL term).
        advantages: (B,) or (B, T).
        mask: (B, T) the multi-turn loss mask (both assistant turns).
        entropy: (B, T) per-token entropy carrying grad (see :func:`entropy_from_logits`), or ``None``.
        coefs: the coefficients.
        normalizer: shared denominator of all three token-means (see :func:`ppo_clip_loss`).

    Returns:
        ``(loss, metrics)``: the scalar to backpropagate and Python floats ``loss/policy``, ``loss/kl`` (the KL
        mean before its coefficient), ``loss/entropy`` (the entropy mean before its coefficient), ``loss/total``,
        ``actor/clip_frac``, ``actor/approx_kl``. With a normalizer, loss values are this micro-batch's share of the
        mini-batch mean (sum them over micro-batches); the ``actor/*`` ratios are over this call's mask. When
        ``kl_coef`` is 0 but ``ref_logp`` is given the KL is still measured (no grad) for logging; without
        ``ref_logp`` ``loss/kl`` is 0.0, and likewise ``loss/entropy`` without ``entropy``.
    """
    policy, pg_metrics = ppo_clip_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=coefs.clip_low,
        clip_high=coefs.clip_high,
        normalizer=normalizer,
    )
    denom = _normalizer_tensor(normalizer, mask, logp, "mgpo_loss")
    total = policy
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)

    kl_mean = zero
    if ref_logp is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and coefs.kl_coef > 0):
            kl = kl_penalty(logp, ref_logp, kind=coefs.kl_estimator, clamp=coefs.kl_clamp)
            kl_mean = masked_sum(kl, mask) / denom
        if coefs.kl_coef > 0:
            total = total + coefs.kl_coef * kl_mean

    entropy_mean = zero
    if entropy is not None:
        entropy_mean = masked_sum(entropy, mask) / denom
        if coefs.entropy_coef > 0:
            total = total - coefs.entropy_coef * entropy_mean

    metrics = {
        "loss/policy": float(policy.detach()),
        "loss/kl": float(kl_mean.detach()),
        "loss/entropy": float(entropy_mean.detach()),
        "loss/total": float(total.detach()),
        "actor/clip_frac": float(pg_metrics["clip_frac"]),
        "actor/approx_kl": float(pg_metrics["approx_kl"]),
    }
    return total, metrics
