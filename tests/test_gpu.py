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


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_packed_equals_padded_on_cuda(tiny_dir, tiny_bundle, episodes, dtype, tol):
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
    torch.testing.assert_close(lp1, lp0, atol=tol, rtol=0)
    for name in g0:
        scale = float(g0[name].abs().max()) + 1e-12
        assert float((g1[name] - g0[name]).abs().max()) / scale < 10 * tol, name
