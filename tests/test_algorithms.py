"""Tests of mgpo_core.algorithms: hand-computed values, loop references, gradients and edge cases of the RL math."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpo_core.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    LossCoefficients,
    Registry,
    UnknownNameError,
    broadcast_advantages,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    mgpo_loss,
    ppo_clip_loss,
)


@pytest.fixture(autouse=True, scope="module")
def float64_default():
    """The reference loops use Python floats: compare in float64, restoring the global default for other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --------------------------------------------------------------------------------------------------------------------
# Independent references, written the most obvious way (Python loops over floats)


def ref_grpo(
    rewards: list[float], groups: list[object], eps: float = 1e-6, normalize_std: bool = True
) -> list[float]:
    members: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        values = [rewards[i] for i in idx]
        if len(values) == 1 or max(values) == min(values):
            continue
        mean = statistics.fmean(values)
        std = statistics.stdev(values)  # Bessel-corrected
        for i in idx:
            out[i] = (rewards[i] - mean) / (std + eps) if normalize_std else rewards[i] - mean
    return out


def ref_kl(logp: float, ref: float, kind: str, clamp: float = 10.0) -> float:
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    d = ref - logp
    return min(max(math.exp(d) - d - 1.0, -clamp), clamp)


def ref_ppo(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, normalizer=None) -> tuple[float, float]:
    """Token-mean clipped surrogate and clip fraction; ``adv`` is per trajectory (list of B floats)."""
    total, tokens, clipped_tokens = 0.0, 0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            clipped_ratio = min(max(ratio, 1 - clip_low), 1 + clip_high)
            surrogate = -adv[b] * ratio
            surrogate_clipped = -adv[b] * clipped_ratio
            total += max(surrogate, surrogate_clipped)
            tokens += 1
            clipped_tokens += surrogate_clipped > surrogate
    denom = normalizer if normalizer is not None else tokens
    return (total / denom if denom else 0.0), (clipped_tokens / tokens if tokens else 0.0)


def random_batch(b: int, t: int, seed: int, spread: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen) * 3
    old = logp + torch.randn(b, t, generator=gen) * spread
    ref = logp + torch.randn(b, t, generator=gen) * spread
    adv = torch.randn(b, generator=gen)
    mask = torch.rand(b, t, generator=gen) > 0.3
    return logp, old, ref, adv, mask


# --------------------------------------------------------------------------------------------------------------------
# Hand-computed values


def test_grpo_two_groups_match_hand_computed_advantages():
    # Group 0 = [1, 0, 0, 1]: mean 0.5, deviations ±0.5, Σd² = 1, unbiased var = 1/3, std = 1/√3 ≈ 0.57735,
    #   so A = ±0.5 / (1/√3 + 1e-6) = ±(√3/2) / (1 + √3·1e-6) ≈ ±0.866024.
    # Group 1 = [1, 1, 1, 1]: all equal → exactly 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    a = 0.5 / (1 / math.sqrt(3) + 1e-6)
    assert adv.tolist()[:4] == pytest.approx([a, -a, -a, a], abs=1e-12)
    assert adv[4:].eq(0).all()


def test_ppo_clip_loss_with_active_clip_matches_hand_computed_value():
    # token 1: ratio 1.5, A=+1 → max(−1.5, −1.2) = −1.2  (clipped branch taken)
    # token 2: ratio 0.5, A=+1 → max(−0.5, −0.8) = −0.5  (unclipped branch: pessimistic bound)
    # token 3: ratio 0.5, A=−1 → max(+0.5, +0.8) = +0.8  (clipped branch taken)
    # token 4: masked out (huge ratio, must not count).  Mean over 3 tokens = (−1.2 − 0.5 + 0.8) / 3 = −0.3.
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 50.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = ppo_clip_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(-0.3)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5) / 3)
    # approx_kl = mean of k3(old ‖ new) = (ratio − 1) − ln ratio: (0.5 − ln 1.5) once, (−0.5 + ln 2) twice.
    expected_kl = ((0.5 - math.log(1.5)) + 2 * (math.log(2) - 0.5)) / 3
    assert metrics["approx_kl"].item() == pytest.approx(expected_kl)


def test_low_var_kl_at_known_point():
    # ref − logp = ln 2 → k3 = 2 − ln 2 − 1 = 1 − ln 2 ≈ 0.30685; k1 = −ln 2; k2 = ½ ln²2.
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[math.log(2)]])
    assert kl_penalty(logp, ref).item() == pytest.approx(1 - math.log(2))
    assert kl_penalty(logp, ref, kind="k1").item() == pytest.approx(-math.log(2))
    assert kl_penalty(logp, ref, kind="k2").item() == pytest.approx(0.5 * math.log(2) ** 2)


def test_low_var_kl_is_clamped_and_keeps_finite_gradient_far_from_reference():
    logp = torch.tensor([[-100.0, 0.0]], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([[0.0, -100.0]], dtype=torch.float32)
    kl = kl_penalty(logp, ref, clamp=10.0)
    assert kl[0, 0].item() == 10.0  # exp(100) overflows fp32: without the log-ratio clamp the gradient is NaN
    assert kl[0, 1].item() == 10.0  # exp(−20) + 20 − 1 ≈ 19 → clamped to 10
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_masked_mean_excludes_masked_positions_even_when_they_hold_nan():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert masked_sum(x, mask).item() == pytest.approx(13.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 5.0])


def test_masked_mean_of_row_with_empty_mask_is_zero_not_nan():
    x = torch.randn(2, 3)
    mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    per_row = masked_mean(x, mask, dim=-1)
    assert per_row[0].item() == 0.0
    assert per_row[1].item() == pytest.approx(x[1, :2].mean().item())


def test_masked_sum_with_mismatched_shapes_says_what_to_fix():
    with pytest.raises(ValueError, match=r"masked_sum: shapes must match.*x=\(2, 3\).*mask=\(2, 4\)"):
        masked_sum(torch.zeros(2, 3), torch.ones(2, 4))


def test_entropy_of_uniform_and_one_hot_distributions():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [50.0, -50.0, -50.0, -50.0]]])
    h = entropy_from_logits(logits)
    assert h.shape == (1, 2)
    assert h[0, 0].item() == pytest.approx(math.log(4))
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Loop reference vs vectorised implementation


@pytest.mark.parametrize("n_groups,group_size", [(1, 2), (3, 8), (16, 4), (5, 1), (7, 3)])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_per_group_loop_on_random_rewards(n_groups, group_size, normalize_std):
    gen = torch.Generator().manual_seed(n_groups * 100 + group_size)
    rewards = torch.randn(n_groups * group_size, generator=gen)
    groups = (
        torch.randperm(n_groups * group_size, generator=gen) % n_groups
    )  # shuffled, non-contiguous groups
    adv = grpo_advantages(rewards, groups, normalize_std=normalize_std)
    expected = ref_grpo(rewards.tolist(), groups.tolist(), normalize_std=normalize_std)
    assert adv.tolist() == pytest.approx(expected, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["p0", "p1", "p2", "p3", "p4"]), st.sampled_from([0.0, 0.5, 1.0, -2.0, 3.25])
        ),
        min_size=1,
        max_size=40,
    )
)
def test_grpo_matches_loop_reference_for_arbitrary_group_layouts(pairs):
    groups = [g for g, _ in pairs]
    rewards = [r for _, r in pairs]
    adv = grpo_advantages(torch.tensor(rewards), groups)
    assert adv.tolist() == pytest.approx(ref_grpo(rewards, groups), abs=1e-9)
    # Group-relative advantages sum to zero within every group.
    for g in set(groups):
        assert sum(a for a, h in zip(adv.tolist(), groups, strict=True) if h == g) == pytest.approx(
            0.0, abs=1e-9
        )


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (5, 3), (8, 33)])
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
def test_ppo_clip_loss_matches_per_token_loop(shape, clip):
    logp, old, _, adv, mask = random_batch(*shape, seed=shape[0] * 31 + shape[1])
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, clip_low=clip[0], clip_high=clip[1])
    expected_loss, expected_clip_frac = ref_ppo(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), clip_low=clip[0], clip_high=clip[1]
    )
    assert loss.item() == pytest.approx(expected_loss, abs=1e-10)
    assert metrics["clip_frac"].item() == pytest.approx(expected_clip_frac, abs=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (6, 17)])
@pytest.mark.parametrize("kind", ["k1", "k2", "low_var_kl", "k3"])
def test_kl_penalty_matches_per_token_loop(shape, kind):
    logp, _, ref, _, _ = random_batch(*shape, seed=7, spread=3.0)
    kl = kl_penalty(logp, ref, kind=kind)
    loop_kind = "low_var_kl" if kind == "k3" else kind
    for b in range(shape[0]):
        for t in range(shape[1]):
            assert kl[b, t].item() == pytest.approx(
                ref_kl(logp[b, t].item(), ref[b, t].item(), loop_kind), abs=1e-12
            )


def test_kl_estimators_average_to_true_kl_under_policy_samples():
    # Cross-check of the estimator definitions (re-derived, as in Schulman's note used by TRL/verl): with tokens
    # drawn from π, E_π[k1] = E_π[k3] = KL(π ‖ π_ref) exactly; here the expectation is taken over the whole vocab.
    gen = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(6, generator=gen), dim=0)
    ref = torch.log_softmax(torch.randn(6, generator=gen), dim=0)
    true_kl = (logp.exp() * (logp - ref)).sum().item()
    probs = logp.exp()
    for kind in ("k1", "low_var_kl"):
        expectation = (probs * kl_penalty(logp[None], ref[None], kind=kind, clamp=None)[0]).sum().item()
        assert expectation == pytest.approx(true_kl, rel=1e-9)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
def test_entropy_matches_definition_and_is_chunk_invariant(chunk_size):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 7, 13, generator=gen) * 4
    probs = torch.softmax(logits, dim=-1)
    expected = -(probs * probs.log()).sum(-1)
    assert torch.allclose(entropy_from_logits(logits, chunk_size=chunk_size), expected, atol=1e-12)


def test_entropy_ignores_negative_infinite_logits_without_nan():
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(logits)
    assert h.item() == pytest.approx(math.log(2))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_of_bfloat16_logits_is_computed_in_float32():
    logits = torch.randn(1, 4, 50, dtype=torch.float32).to(torch.bfloat16)
    h = entropy_from_logits(logits)
    assert h.dtype == torch.float32
    assert torch.allclose(h, entropy_from_logits(logits.float()), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Gradients


def test_policy_gradient_is_zero_on_masked_tokens_and_nonzero_on_loss_tokens():
    logp0, _, _, adv, mask = random_batch(4, 9, seed=5)
    adv = adv + 0.1 * adv.sign()  # keep every advantage away from 0
    logp = logp0.clone().requires_grad_(True)
    loss, _ = ppo_clip_loss(logp, logp0.clone(), adv, mask)  # ratio 1: inside the clip range everywhere
    loss.backward()
    assert logp.grad[~mask].eq(0).all()
    assert logp.grad[mask].ne(0).all()
    # At ratio 1, d loss / d logp_t = −A_b / n_tokens.
    expected = (-adv[:, None] / mask.sum()).expand_as(logp)[mask]
    assert torch.allclose(logp.grad[mask], expected)


def test_gradient_vanishes_on_tokens_where_clip_is_active():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped, no push further
    assert logp.grad[0, 1].item() < 0.0  # ratio 1.1 inside the range: descent raises logp


def test_gradient_accumulation_with_shared_normalizer_equals_full_batch():
    logp0, old, _, adv, mask = random_batch(6, 11, seed=9)
    full_logp = logp0.clone().requires_grad_(True)
    full_loss, _ = ppo_clip_loss(full_logp, old, adv, mask)
    full_loss.backward()

    total_tokens = mask.sum()
    accumulated = torch.zeros(())
    grads = []
    for rows in (slice(0, 2), slice(2, 6)):  # unequal micro-batches: a mean of means would differ
        micro = logp0[rows].clone().requires_grad_(True)
        loss, _ = ppo_clip_loss(micro, old[rows], adv[rows], mask[rows], normalizer=total_tokens)
        loss.backward()
        accumulated = accumulated + loss.detach()
        grads.append(micro.grad)
    assert accumulated.item() == pytest.approx(full_loss.item(), abs=1e-12)
    assert torch.allclose(torch.cat(grads), full_logp.grad, atol=1e-14)
    # The normalizer matters: per-micro-batch means do not add up to the full token-mean.
    naive = sum(
        ppo_clip_loss(logp0[r], old[r], adv[r], mask[r])[0].item() for r in (slice(0, 2), slice(2, 6))
    )
    assert naive != pytest.approx(full_loss.item(), abs=1e-6)


def test_mgpo_loss_gradient_accumulation_matches_full_batch():
    logp0, old, ref, adv, mask = random_batch(4, 8, seed=21)
    entropy = torch.rand(4, 8, generator=torch.Generator().manual_seed(2))
    coefs = LossCoefficients(kl_coef=0.3, entropy_coef=0.05)
    full, full_metrics = mgpo_loss(logp0, old, ref, adv, mask, entropy, coefs)
    parts = [
        mgpo_loss(logp0[r], old[r], ref[r], adv[r], mask[r], entropy[r], coefs, normalizer=float(mask.sum()))[
            1
        ]
        for r in (slice(0, 1), slice(1, 4))
    ]
    for key in ("loss/policy", "loss/kl", "loss/entropy", "loss/total"):
        assert sum(p[key] for p in parts) == pytest.approx(full_metrics[key], abs=1e-12)
    assert full_metrics["loss/total"] == pytest.approx(full.item())


# --------------------------------------------------------------------------------------------------------------------
# The combined loss


def test_mgpo_loss_total_combines_policy_entropy_and_kl_terms():
    logp0, old, ref, adv, mask = random_batch(3, 6, seed=13)
    entropy = torch.rand(3, 6, generator=torch.Generator().manual_seed(1))
    coefs = LossCoefficients(kl_coef=0.5, entropy_coef=0.25)
    total, m = mgpo_loss(logp0, old, ref, adv, mask, entropy, coefs)
    policy, _ = ppo_clip_loss(logp0, old, adv, mask)
    kl = masked_mean(kl_penalty(logp0, ref), mask)
    ent = masked_mean(entropy, mask)
    assert total.item() == pytest.approx((policy - 0.25 * ent + 0.5 * kl).item())
    assert m["loss/kl"] == pytest.approx(kl.item())
    assert m["loss/entropy"] == pytest.approx(ent.item())
    expected_keys = {
        "loss/policy",
        "loss/kl",
        "loss/entropy",
        "loss/total",
        "actor/clip_frac",
        "actor/approx_kl",
    }
    assert set(m) == expected_keys
    assert all(type(v) is float for v in m.values())


def test_mgpo_loss_without_reference_or_with_zero_kl_coef_has_no_kl_term():
    logp0, old, ref, adv, mask = random_batch(3, 6, seed=17)
    policy, _ = ppo_clip_loss(logp0, old, adv, mask)
    coefs = LossCoefficients(kl_coef=0.0, entropy_coef=0.0)
    no_ref, m_no_ref = mgpo_loss(logp0, old, None, adv, mask, None, LossCoefficients(entropy_coef=0.0))
    zero_coef, m_zero = mgpo_loss(logp0, old, ref, adv, mask, None, coefs)
    assert no_ref.item() == pytest.approx(policy.item())
    assert zero_coef.item() == pytest.approx(policy.item())
    assert m_no_ref["loss/kl"] == 0.0
    assert m_zero["loss/kl"] > 0.0  # still measured for logging when a reference is available


def test_mgpo_loss_kl_term_pulls_policy_towards_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, -2.5]])
    loss, _ = mgpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), None, LossCoefficients())
    loss.backward()
    # Gradient descent moves logp toward ref: the gradient points away from it.
    assert logp.grad[0, 0].item() < 0 < logp.grad[0, 1].item()


# --------------------------------------------------------------------------------------------------------------------
# Edge cases and errors


def test_all_zero_mask_gives_zero_loss_and_zero_gradient_without_nan():
    logp = torch.randn(2, 5).requires_grad_(True)
    mask = torch.zeros(2, 5)
    loss, metrics = ppo_clip_loss(logp, torch.randn(2, 5), torch.ones(2), mask)
    total, m = mgpo_loss(
        logp, torch.randn(2, 5), torch.randn(2, 5), torch.ones(2), mask, torch.rand(2, 5), LossCoefficients()
    )
    (loss + total).backward()
    assert loss.item() == 0.0 and total.item() == 0.0
    assert all(not math.isnan(v.item()) for v in metrics.values())
    assert all(not math.isnan(v) for v in m.values())
    assert logp.grad.eq(0).all()


def test_huge_log_ratio_does_not_produce_inf_or_nan():
    # exp(200) overflows fp32 (as it would for a misaligned token in training).
    f32 = {"dtype": torch.float32}
    logp = torch.tensor([[200.0, -200.0]], **f32, requires_grad=True)
    loss, metrics = ppo_clip_loss(
        logp, torch.zeros(1, 2, **f32), torch.tensor([-1.0], **f32), torch.ones(1, 2, **f32)
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert torch.isfinite(metrics["approx_kl"])


def test_singleton_groups_get_zero_advantage():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), ["a", "b", "c", "c"])
    assert adv[:2].eq(0).all()
    assert adv[2].item() > 0 > adv[3].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_equal_groups_give_exactly_zero_even_for_inexact_floats(dtype):
    # In float64, (0.1 + 0.1 + 0.1) / 3 = 0.10000000000000002 ≠ 0.1: a naive (r − mean) / (std + eps) gives ~1e-11.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7], dtype=dtype)
    adv = grpo_advantages(rewards, torch.tensor([4, 4, 4, 9, 9]))
    assert adv.eq(0).all()
    assert adv.dtype == dtype


def test_tied_rewards_in_a_group_share_the_same_advantage():
    adv = grpo_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), torch.zeros(6, dtype=torch.long))
    assert adv[0] == adv[1] == adv[3]
    assert adv[2] == adv[4] == adv[5]
    assert adv[0].item() == pytest.approx(-adv[2].item())


def test_grpo_rejects_non_finite_rewards_and_names_the_index():
    with pytest.raises(ValueError, match=r"non-finite at indices \[2\]"):
        grpo_advantages(torch.tensor([1.0, 0.0, float("nan")]), [0, 0, 0])


def test_grpo_rejects_group_ids_of_wrong_length_or_dtype():
    with pytest.raises(ValueError, match=r"one id per trajectory, shape \(3,\)"):
        grpo_advantages(torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        grpo_advantages(torch.zeros(3), torch.tensor([0.0, 1.0, 1.0]))


def test_broadcast_advantages_puts_trajectory_value_on_loss_tokens_only():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    out = broadcast_advantages(torch.tensor([2.0, -3.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [0.0, -3.0, -3.0]]


def test_ppo_clip_loss_accepts_per_token_advantages_equal_to_broadcast_ones():
    logp, old, _, adv, mask = random_batch(3, 4, seed=1)
    per_traj, _ = ppo_clip_loss(logp, old, adv, mask)
    per_token, _ = ppo_clip_loss(logp, old, broadcast_advantages(adv, mask), mask)
    assert per_traj.item() == pytest.approx(per_token.item())


def test_ppo_clip_loss_rejects_advantages_of_wrong_shape():
    with pytest.raises(ValueError, match=r"advantages must be \(B,\)=2 or \(B, T\)=\(2, 3\)"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


def test_registry_refuses_duplicate_names():
    registry: Registry = Registry("widget")

    @registry.register("a")
    def first() -> int:
        return 1

    with pytest.raises(ValueError, match="widget 'a' is already registered.*another name"):
        registry.register("a")(lambda: 2)
    assert registry.get("a") is first


def test_unknown_estimator_name_error_lists_valid_names():
    with pytest.raises(UnknownNameError, match="unknown KL estimator 'k9'; known: k1, k2, k3, low_var_kl"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), kind="k9")
    with pytest.raises(KeyError, match="known: grpo"):
        ADVANTAGE_ESTIMATORS.get("gae")


def test_builtin_registries_resolve_to_the_public_functions():
    assert ADVANTAGE_ESTIMATORS.get("grpo") is grpo_advantages
    assert POLICY_LOSSES.get("ppo_clip") is ppo_clip_loss
    assert KL_ESTIMATORS.get("k3") is KL_ESTIMATORS.get("low_var_kl")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"clip_low": 1.0}, "clip_low must be in"),
        ({"kl_coef": -0.1}, "kl_coef must be a finite number"),
        ({"kl_estimator": "k4"}, "choose one of k1, k2, k3, low_var_kl"),
        ({"kl_clamp": 0.0}, "kl_clamp must be > 0"),
    ],
)
def test_loss_coefficients_reject_bad_values_with_a_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossCoefficients(**kwargs)


def test_loss_coefficients_defaults_follow_the_method():
    c = LossCoefficients()
    assert (c.kl_coef, c.entropy_coef, c.clip_low, c.clip_high, c.kl_estimator, c.kl_clamp) == (
        0.01,
        0.001,
        0.2,
        0.2,
        "low_var_kl",
        10.0,
    )
