"""Per-token log-probs under the tiny model: batched = one at a time, equal to the rollout's, M-RoPE positions,
and the MGPO loss's gradient reaches exactly the generated tokens."""

from __future__ import annotations

import pytest
import torch

from mgpo_core.algorithms import LossCoefficients, grpo_advantages, mgpo_loss
from mgpo_core.logprobs import collate_episodes, logprobs_from_logits, token_logprobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def episodes(tiny_bundle, tiny_cfg, synthetic_samples):
    from mgpo_core.rollout.hf import HFRolloutEngine

    b = tiny_bundle
    eng = HFRolloutEngine.for_bundle(b, tiny_cfg)
    return eng.generate_episodes(synthetic_samples[:2], n=2, seed=3)


def test_batched_logprobs_equal_one_episode_at_a_time(tiny_bundle, episodes):
    m, pad = tiny_bundle.model, tiny_bundle.special.pad
    with torch.no_grad():
        batched, _ = token_logprobs(m, collate_episodes(episodes, m, pad))
        for i, ep in enumerate(episodes):
            single, _ = token_logprobs(m, collate_episodes([ep], m, pad))
            torch.testing.assert_close(batched[i, : ep.length], single[0], atol=1e-5, rtol=0)
            assert (batched[i, ep.length :] == 0).all()


def test_trainer_logprobs_match_the_rollout_engine(tiny_bundle, episodes):
    """Same weights, same M-RoPE positions: the trainer's log-probs equal what ``generate`` sampled with."""
    m, sp = tiny_bundle.model, tiny_bundle.special
    with torch.no_grad():
        logp, _ = token_logprobs(m, collate_episodes(episodes, m, sp.pad), suppress_ids=sp.non_text_ids())
    for i, ep in enumerate(episodes):
        sel = torch.isfinite(ep.rollout_logprobs)
        torch.testing.assert_close(logp[i, : ep.length][sel], ep.rollout_logprobs[sel], atol=2e-4, rtol=0)


def test_position_ids_are_3d_mrope_over_both_images(tiny_bundle, episodes):
    sp = tiny_bundle.special
    batch = collate_episodes(episodes[:1], tiny_bundle.model, sp.pad)
    pos = batch.position_ids[:, 0, : episodes[0].length]
    assert pos.shape[0] == 3
    img = episodes[0].mm_token_type_ids.bool()
    # Inside images the three rows differ (t, h, w); on text they agree.
    assert (pos[1][img] != pos[2][img]).any()
    assert torch.equal(pos[0][~img], pos[1][~img]) and torch.equal(pos[1][~img], pos[2][~img])
    # Two image spans, and text positions keep increasing after each.
    text_pos = pos[0][~img]
    assert (text_pos[1:] > text_pos[:-1]).all()
    # An image of grid h×w advances the text position by max(h, w)/merge, far less than its token count.
    assert int(pos[0].max()) + 1 < episodes[0].length


def test_loss_gradient_is_zero_at_masked_positions_and_nonzero_at_generated(tiny_bundle, episodes):
    """The loss masks by itself: every term gets UNMASKED full-sequence inputs (log-probs of every token, a reference
    that differs everywhere, entropies everywhere), so only ``mgpo_loss``'s own use of ``loss_mask`` can keep the
    prompt, the inserted user turn, the image tokens and the padding out of the gradient."""
    from mgpo_core.logprobs import entropy_from_logits, forward_hidden

    m = tiny_bundle.model
    batch = collate_episodes(episodes, m, tiny_bundle.special.pad)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])  # fixed so every group has non-zero advantages
    adv = grpo_advantages(rewards, torch.tensor([e.group for e in episodes]))
    logits = m.lm_head(forward_hidden(m, batch))
    logits.retain_grad()
    logp = logprobs_from_logits(logits, batch.input_ids)  # every position, masked or not
    assert (logp[batch.loss_mask == 0] != 0).any(), "the inputs must carry values where the mask is 0"
    old = logp.detach() - 0.01  # ratio ≠ 1 but inside the clip range
    ref = logp.detach() + 0.05  # a KL term with a non-zero gradient at every position
    coefs = LossCoefficients(kl_coef=0.1, entropy_coef=0.01)
    loss, _ = mgpo_loss(logp, old, ref, adv, batch.loss_mask, entropy_from_logits(logits), coefs)
    loss.backward()
    g = logits.grad.abs().sum(-1)  # (B, L): grad at position t drives the log-prob of token t+1
    target_mask = batch.loss_mask[:, 1:].bool()
    g_pred = g[:, :-1]
    assert (g_pred[~target_mask] == 0).all(), (
        "masked tokens (prompt, inserted turn, images, padding) got gradient"
    )
    assert (g_pred[target_mask] > 0).all(), "a generated token got no gradient"
    assert (g[:, -1] == 0).all()
