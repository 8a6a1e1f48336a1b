"""Shared-prompt packing (ISSUE 11): the n rollouts of a prompt run their common prompt once, and the log-probs,
entropies and gradients are those of the padded batch (METHOD.md §2b: the update is its definition, whatever
work is saved).

The reference is the plain padded batch with the model's own causal mask, an independent path through the same
model; packing changes which tokens the model runs, never what each token sees.
"""

from __future__ import annotations

import pytest
import torch

from mgpo_core.logprobs import collate_episodes, token_logprobs
from mgpo_core.packing import pack_batch, prompt_groups

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def episodes(tiny_bundle, tiny_cfg, synthetic_samples):
    """3 prompts × n = 3 two-turn episodes, temperature 1 (their continuations differ in length)."""
    from mgpo_core.rollout.hf import HFRolloutEngine

    eng = HFRolloutEngine.for_bundle(tiny_bundle, tiny_cfg)
    eps = eng.generate_episodes(synthetic_samples[:3], n=3, seed=11)
    assert len({ep.length for ep in eps}) > 1
    return eps


def _logprobs_and_grads(model, batch, sp):  # noqa: ANN001, ANN202
    model.zero_grad(set_to_none=True)
    logp, ent = token_logprobs(model, batch, with_entropy=True, temperature=0.7, suppress_ids=sp.non_text_ids())
    # A loss that weights every token differently, so a wrong mapping cannot cancel out.
    w = torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)
    ((logp * w).sum() + (ent * w).sum() * 0.1).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_packed_logprobs_entropies_and_gradients_equal_the_padded_batch(tiny_dir, tiny_bundle, episodes, checkpointing):
    """Also under gradient checkpointing (the 7B recipe's setting): the backward replays each layer with the
    same shared-prompt layout."""
    from mgpo_core.modeling.loading import load_model

    sp = tiny_bundle.special
    m = load_model(tiny_dir, dtype="float32")
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    # Shuffle so members of a prompt are not adjacent: packing must find them by group.
    order = [0, 4, 8, 1, 5, 2, 6, 3, 7]
    eps = [episodes[i] for i in order]
    plain = collate_episodes(eps, m, sp.pad)
    packed = collate_episodes(eps, m, sp.pad, share_prompt=True)
    assert plain.packed is None and packed.packed is not None
    assert packed.packed.input_ids.shape[0] == 3  # one row per prompt
    saved = 1 - packed.packed.tokens / sum(ep.length for ep in eps)
    assert saved > 0.3, saved
    lp0, ent0, g0 = _logprobs_and_grads(m, plain, sp)
    lp1, ent1, g1 = _logprobs_and_grads(m, packed, sp)
    assert (lp0 != 0).sum() > 50
    torch.testing.assert_close(lp1, lp0, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=2e-5, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        scale = float(g0[name].abs().max()) + 1e-12
        err = float((g1[name] - g0[name]).abs().max())
        assert err / scale < 1e-4, (name, err, scale)
    # The vision tower and the embeddings got a gradient through the shared prompt.
    assert any("visual" in n and float(g1[n].abs().max()) > 0 for n in g1)


def test_packed_logprobs_match_the_rollout_engine(tiny_bundle, tiny_cfg, episodes):
    """Packed log-probs are those of the distribution the rollout sampled from (temperature 1 here)."""
    m, sp = tiny_bundle.model, tiny_bundle.special
    batch = collate_episodes(episodes, m, sp.pad, share_prompt=True)
    with torch.no_grad():
        logp, _ = token_logprobs(m, batch, suppress_ids=sp.non_text_ids(), temperature=tiny_cfg.rollout.temperature)
    for i, ep in enumerate(episodes):
        sel = torch.isfinite(ep.rollout_logprobs)
        torch.testing.assert_close(logp[i, : ep.length][sel], ep.rollout_logprobs[sel], atol=2e-4, rtol=0)


def test_episodes_that_only_claim_a_group_are_not_packed_together(tiny_bundle, episodes):
    """Sharing is checked, not assumed: an episode of another prompt relabelled into a group gets its own row."""
    import dataclasses

    eps = [episodes[0], episodes[1], dataclasses.replace(episodes[3], group=episodes[0].group)]
    rows = prompt_groups(eps)
    assert [m for m, _, _ in rows] == [[0, 1], [2]]
    assert rows[0][1] == episodes[0].prompt_len and rows[1][1] == 0
    # No episode shares a prompt: nothing to pack.
    assert pack_batch([episodes[0], episodes[3]], torch.zeros(3, 2, 1, dtype=torch.long), 0, 1) is None


def test_shared_prompt_attention_equals_dense_masked_attention():
    """The structured attention against its definition: softmax over the keys a dense mask allows (prompt causal,
    each continuation sees the prompt and itself causally), written out with plain tensor ops; GQA heads."""
    from mgpo_core.packing import SharedPromptMask, shared_prompt_attention

    torch.manual_seed(0)
    # Row 0: prompt 5, continuations of 3, 1 and 4 tokens, 2 padding; row 1: one episode of 9 tokens, 6 padding.
    seg = torch.tensor([[0] * 5 + [1] * 3 + [2] + [3] * 4 + [-1] * 2, [0] * 9 + [-1] * 6])
    r, length, h, h_kv, d = 2, seg.shape[1], 4, 2, 8
    q, k, v = torch.randn(r, h, length, d), torch.randn(r, h_kv, length, d), torch.randn(r, h_kv, length, d)

    class Attn(torch.nn.Module):
        num_key_value_groups = h // h_kv

    out, _ = shared_prompt_attention(Attn(), q, k, v, SharedPromptMask.from_segments(seg), scaling=0.3)
    assert out.shape == (r, length, h, d)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    qi, ki = torch.arange(length)[:, None], torch.arange(length)[None, :]
    for row in range(r):
        s_q, s_k = seg[row][:, None], seg[row][None, :]
        allowed = (ki <= qi) & ((s_k == 0) | (s_k == s_q))
        scores = (q[row] @ kk[row].transpose(-1, -2)) * 0.3
        ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vv[row]  # (H, L, D)
        real = seg[row] >= 0
        torch.testing.assert_close(out[row][real], ref.transpose(0, 1)[real], atol=1e-5, rtol=1e-5)
        assert (out[row][~real] == 0).all()


def test_micro_batch_order_keeps_a_prompts_rollouts_together(episodes):
    """With packing, micro-batches are cut from whole groups (longest packed group first), so a micro-batch of n
    episodes holds one prompt and runs it once; without, episodes are sorted by length alone."""
    import dataclasses

    from mgpo_core.algorithms import LossCoefficients
    from mgpo_core.training.update import UpdateSettings, micro_batch_order

    eps = [episodes[i] for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)]  # groups interleaved
    settings = UpdateSettings(coefs=LossCoefficients(), micro_batch_size=3, pad_id=0, share_prompt=True)
    order = micro_batch_order(eps, settings)
    assert sorted(order) == list(range(9))
    groups = [[eps[i].group for i in order[k : k + 3]] for k in range(0, 9, 3)]
    assert all(len(set(g)) == 1 for g in groups), groups
    packed = [sum(eps[i].length for i in order[k : k + 3]) - 2 * eps[order[k]].prompt_len for k in (0, 3, 6)]
    assert packed == sorted(packed, reverse=True)
    plain = micro_batch_order(eps, dataclasses.replace(settings, share_prompt=False))
    assert [eps[i].length for i in plain] == sorted((ep.length for ep in eps), reverse=True)


def test_forward_tokens_counts_each_shared_prompt_once_per_micro_batch(episodes):
    """The logged ``perf/forward_tokens``: the packed rows' real tokens, micro-batch by micro-batch."""
    import dataclasses

    from mgpo_core.algorithms import LossCoefficients
    from mgpo_core.training.update import UpdateSettings, forward_tokens

    settings = UpdateSettings(coefs=LossCoefficients(), micro_batch_size=3, pad_id=0, share_prompt=True)
    minis = [(episodes, None)]  # 3 prompts × 3 rollouts in group order: one prompt per micro-batch
    assert forward_tokens(minis, settings) == sum(ep.length for ep in episodes) - sum(
        2 * episodes[k].prompt_len for k in (0, 3, 6)
    )
    plain = dataclasses.replace(settings, share_prompt=False)
    assert forward_tokens(minis, plain) == sum(ep.length for ep in episodes)
    # Micro-batches of 2 cut a prompt's 3 rollouts: a pair of one prompt runs it once, a mixed pair twice.
    two = dataclasses.replace(settings, micro_batch_size=2)
    expect = 0
    for k in range(0, 9, 2):
        chunk = episodes[k : k + 2]
        same = len(chunk) == 2 and chunk[0].group == chunk[1].group
        expect += sum(ep.length for ep in chunk) - (chunk[0].prompt_len if same else 0)
    assert forward_tokens(minis, two) == expect
