"""CUDA checks (``pytest -m gpu``; skipped without a CUDA device, run by ``bench/gpu_check.sh``).

Shared-prompt packing on the GPU's attention kernels: PyTorch dispatches the prompt's causal attention and the
continuations' lower-right causal attention to its flash / memory-efficient kernels there (the CPU runs its own
kernel), so the equality of packed and padded log-probs and gradients is checked again on CUDA, in float32 and
in bfloat16 (the recipe's dtype, where only a bf16-sized difference is expected).
"""

from __future__ import annotations

import pytest
import torch

from mgpo_core.logprobs import collate_episodes, token_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def episodes(tiny_bundle, tiny_cfg, synthetic_samples):
    from mgpo_core.rollout.hf import HFRolloutEngine

    eng = HFRolloutEngine.for_bundle(tiny_bundle, tiny_cfg)
    return eng.generate_episodes(synthetic_samples[:2], n=4, seed=7)


BF16_UNIT_ROUNDOFF = 2.0**-8
"""bfloat16 keeps 8 significant bits (7 stored + the implicit one): u = 2^-8 ≈ 3.9e-3, and one ulp of a value x
is at most 2u·|x|. (float32: u = 2^-24.)"""
ULPS_LOGPROB = 4
"""Packed and padded run the same weights through the same operations; only the attention kernel differs (its
masks and accumulation order), so each bf16 rounding may land on a neighbouring value. A log-prob z_t − lse(z) is
two rounded quantities of the logits' size S (2 ulps), plus ≤ 1 ulp carried from each of the tiny model's 2
layers' attention output: 4 ulps of S = 8u·S."""
ULPS_GRAD = 6
"""A gradient passes the same roundings backwards as well as forwards: 2 + 2 per layer = 6 ulps of the largest
gradient entry of the parameter, 12u ≈ 4.7 % (was an unexplained 30 %)."""


def _tolerances(dtype: str) -> tuple[float, float]:
    """(log-prob tolerance per unit of logit scale, gradient tolerance relative to the largest entry)."""
    u = BF16_UNIT_ROUNDOFF if dtype == "bfloat16" else 2.0**-24
    return ULPS_LOGPROB * 2 * u, ULPS_GRAD * 2 * u


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_equals_padded_on_cuda(tiny_dir, tiny_bundle, episodes, dtype):
    from mgpo_core.logprobs import forward_hidden
    from mgpo_core.modeling.loading import load_model

    model = load_model(tiny_dir, dtype=dtype, device="cuda")
    model.train()
    sp, dt = tiny_bundle.special, getattr(torch, dtype)
    out = []
    for share in (False, True):
        batch = collate_episodes(episodes, model, sp.pad, share_prompt=share).to("cuda", dt)
        model.zero_grad(set_to_none=True)
        logp, _ = token_logprobs(model, batch, suppress_ids=sp.non_text_ids())
        logp.sum().backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((logp.detach().float(), grads))
    (lp0, g0), (lp1, g1) = out
    assert (lp0 != 0).sum() > 20
    with torch.no_grad():  # the logits' scale S at the loss positions (the padded run)
        padded = collate_episodes(episodes, model, sp.pad).to("cuda", dt)
        logits = model.lm_head(forward_hidden(model, padded))[:, :-1][padded.loss_mask[:, 1:] != 0]
        scale = float(logits.float().abs().max())
    per_scale, grad_rel = _tolerances(dtype)
    # float32 keeps the former bound as a floor: 8u·S is ~1e-6 there, below what reordered float32 sums reach.
    atol = max(per_scale * scale, 1e-4 if dtype == "float32" else 0.0)
    torch.testing.assert_close(lp1, lp0, atol=atol, rtol=0)
    for name in g0:
        top = float(g0[name].abs().max()) + 1e-12
        worst = float((g1[name] - g0[name]).abs().max()) / top
        assert worst <= max(grad_rel, 1e-3 if dtype == "float32" else 0.0), (name, worst)
