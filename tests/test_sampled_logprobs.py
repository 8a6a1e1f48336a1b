"""Log-probs of the distribution actually sampled, tokens the model did not sample, and what the loss needs
(METHOD.md §2b).

- at temperature 0.7 the trainer's log-probs of the sampled tokens equal the engine's, for the HF engine and
  vLLM-CPU (and differ from the untempered ones by far more than the tolerance: the check can fail);
- the head applied only at the loss positions, checkpointed in chunks, gives the same log-probs, entropies and
  gradients as the full-logits computation;
- a forced ``<|im_end|>`` is context, not a loss token (unless ``algorithm.train_forced_tokens``);
- turn 1's ``\\boxed{}`` never earns the reward; an episode whose turn 2 had no budget gets 0.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scripted import ScriptedEngine, box_reply

from mgpo_core.algorithms import LossCoefficients, mgpo_loss
from mgpo_core.config import load_config
from mgpo_core.episodes import TURN1_TOKEN, train_mask
from mgpo_core.logprobs import collate_episodes, entropy_from_logits, forward_hidden, logprobs_from_logits
from mgpo_core.training.rewards import get_reward
from mgpo_core.training.update import UpdateSettings

T = 0.7
SMALL = [
    "rollout.min_pixels=3136",
    "rollout.max_pixels=12544",
    "rollout.max_new_tokens_turn1=12",
    "rollout.max_new_tokens_turn2=8",
    f"rollout.temperature={T}",
]


def _gaps(model, episodes, settings):  # noqa: ANN001, ANN202
    """|trainer − engine| over the sampled tokens, for the trainer's settings and for untempered log-probs."""
    batch = settings.collate(episodes, model, torch.device("cpu"), next(model.parameters()).dtype)
    with torch.no_grad():
        logp, _ = settings.logprobs(model, batch)
        raw, _ = dataclasses.replace(settings, temperature=1.0).logprobs(model, batch)
    diffs, raw_diffs = [], []
    for i, ep in enumerate(episodes):
        sel = torch.isfinite(ep.rollout_logprobs) & (batch.loss_mask[i, : ep.length] > 0)
        assert torch.equal(sel, torch.isfinite(ep.rollout_logprobs)), "every sampled token is a loss token"
        diffs.append((logp[i, : ep.length][sel] - ep.rollout_logprobs[sel]).abs())
        raw_diffs.append((raw[i, : ep.length][sel] - ep.rollout_logprobs[sel]).abs())
    return torch.cat(diffs), torch.cat(raw_diffs)


@pytest.mark.slow
def test_hf_engine_at_temperature_07_samples_the_distribution_the_trainer_scores(
    tiny_bundle, synthetic_samples
):
    from mgpo_core.rollout.hf import HFRolloutEngine

    cfg = load_config("tiny-cpu", SMALL)
    b = tiny_bundle
    eng = HFRolloutEngine.for_bundle(b, cfg)
    episodes = eng.generate_episodes(synthetic_samples[:2], n=2, seed=5)
    d, raw = _gaps(b.model, episodes, UpdateSettings.from_config(cfg, b.special))
    print(
        f"\nHF T={T}: max |trainer − engine| {d.max():.2e} over {d.numel()} tokens; untempered {raw.mean():.3f}"
    )
    assert d.numel() > 10 and d.max() < 2e-4
    assert raw.mean() > 100 * 2e-4, "at T = 0.7 the untempered log-probs must not pass the same check"


@pytest.mark.slow
def test_vllm_engine_at_temperature_07_samples_the_distribution_the_trainer_scores(
    tiny_dir, tiny_bundle, synthetic_samples
):
    pytest.importorskip("vllm")
    from mgpo_core.rollout import ENGINES

    cfg = load_config("tiny-cpu", SMALL)
    eng = ENGINES["vllm"](model_dir=tiny_dir, bundle=tiny_bundle, cfg=cfg, max_model_len=4096)
    try:
        episodes = eng.generate_episodes(synthetic_samples[:2], n=2, seed=5)
    finally:
        eng.close()
    d, raw = _gaps(tiny_bundle.model, episodes, UpdateSettings.from_config(cfg, tiny_bundle.special))
    print(
        f"\nvLLM T={T}: max |trainer − engine| {d.max():.2e} over {d.numel()} tokens; untempered {raw.mean():.3f}"
    )
    assert d.numel() > 10 and d.max() < 2e-4
    assert raw.mean() > 100 * 2e-4


def test_head_at_loss_positions_only_equals_the_full_logits_computation(
    tiny_bundle, tiny_cfg, synthetic_samples
):
    """Values and gradients of the selective, checkpointed head equal log-softmax over every position's logits."""
    m, sp = tiny_bundle.model, tiny_bundle.special
    eng = ScriptedEngine(
        tiny_bundle, tiny_cfg, [box_reply(10, 10, 200, 150), "not a box"], "It is \\boxed{A}"
    )
    episodes = eng.generate_episodes(synthetic_samples[:1], n=2)
    s = UpdateSettings(LossCoefficients(), 2, sp.pad, temperature=T, suppress_ids=tuple(sp.non_text_ids()))
    batch = s.collate(episodes, m, torch.device("cpu"), torch.float32)
    banned = torch.tensor(sp.non_text_ids())
    for chunk in (3, 512):  # several chunks, and one
        m.zero_grad()
        from mgpo_core.logprobs import token_logprobs

        logp, ent = token_logprobs(
            m, batch, with_entropy=True, temperature=T, suppress_ids=s.suppress_ids, chunk_size=chunk
        )
        (logp.sum() + ent.sum()).backward()
        got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad()
        logits = m.lm_head(forward_hidden(m, batch)) / T
        logits[..., banned] = float("-inf")
        on = batch.loss_mask > 0  # (banned ids sit at -inf: masked positions may hold -inf or NaN)
        full_lp = torch.where(on, logprobs_from_logits(logits, batch.input_ids), 0.0)
        full_ent = torch.where(on, entropy_from_logits(logits), 0.0)
        (full_lp.sum() + full_ent.sum()).backward()
        torch.testing.assert_close(logp, full_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, full_ent, atol=1e-5, rtol=0)
        for n, p in m.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
        m.zero_grad()


def test_forced_end_of_turn1_is_context_not_a_loss_token(tiny_bundle, tiny_cfg, synthetic_samples):
    sp = tiny_bundle.special
    reply = box_reply(
        10, 10, 200, 150, tail="\nand the model keeps talking"
    )  # cut after the block: forced end
    (ep,) = ScriptedEngine(tiny_bundle, tiny_cfg, [reply], "\\boxed{B}").generate_episodes(
        synthetic_samples[:1], n=1
    )
    last1 = int(torch.nonzero(ep.turn_index == TURN1_TOKEN).max())
    assert int(ep.input_ids[last1]) == sp.im_end and bool(ep.forced[last1])
    assert int(ep.forced.sum()) == 1 and torch.isnan(ep.rollout_logprobs[last1])
    assert ep.loss_mask[last1] == 1, "in the MGPO mask of the assistant turns"
    assert train_mask(ep, False)[last1] == 0 and train_mask(ep, False).sum() == ep.loss_mask.sum() - 1
    assert torch.equal(train_mask(ep, True), ep.loss_mask)
    # The trainer's loss: no gradient reaches the forced token's log-prob, and it is not counted in the mean.
    m = tiny_bundle.model
    for train_forced in (False, True):
        batch = collate_episodes([ep], m, sp.pad, train_forced=train_forced)
        logits = m.lm_head(forward_hidden(m, batch))
        logits.retain_grad()
        logp = logprobs_from_logits(logits, batch.input_ids) * batch.loss_mask
        loss, _ = mgpo_loss(
            logp, logp.detach(), None, torch.tensor([-1.0]), batch.loss_mask, None, LossCoefficients()
        )
        loss.backward()
        g = logits.grad[0, last1 - 1].abs().sum()  # position last1 - 1 predicts the forced token
        assert (g > 0) == train_forced
        assert batch.loss_mask.sum() == train_mask(ep, train_forced).sum()
    cfg = load_config("tiny-cpu")
    assert cfg.algorithm.train_forced_tokens is False
    assert UpdateSettings.from_config(cfg, sp).train_forced is False


def test_a_box_in_turn1_never_earns_the_reward(tiny_bundle, tiny_cfg, synthetic_samples):
    s = synthetic_samples[0]
    right = f"\\boxed{{{s.answer}}}"
    reward = get_reward("answer")
    # Turn 2 answers nothing: turn 1's (right) box does not count.
    (ep,) = ScriptedEngine(tiny_bundle, tiny_cfg, [f"{right} no box"], "I cannot tell").generate_episodes(
        [s], n=1
    )
    assert ep.turn2_answered and ep.reward == 0.0 == reward(ep)
    # Turn 2 answers right: 1.
    (ep,) = ScriptedEngine(tiny_bundle, tiny_cfg, ["no box"], f"so {right}").generate_episodes([s], n=1)
    assert ep.reward == 1.0 == reward(ep)


def test_turn2_without_budget_gets_no_reward_and_is_marked_truncated(tiny_bundle, synthetic_samples):
    s = synthetic_samples[0]
    cfg = load_config("tiny-cpu", ["rollout.max_response_tokens=24"])  # less than the inserted turn-2 prompt
    long_turn1 = f"thinking {' '.join(['word'] * 8)} \\boxed{{{s.answer}}}"
    eng = ScriptedEngine(tiny_bundle, cfg, [long_turn1], f"\\boxed{{{s.answer}}}")
    (ep,) = eng.generate_episodes([s], n=1)
    assert len(eng.calls) == 1, "turn 2 never ran"
    assert not ep.turn2_answered and ep.truncated
    assert ep.reward == 0.0 == get_reward("answer")(ep)
    assert ep.length <= ep.prompt_len + 24
    # Its turn-1 tokens still carry the episode's (reward-0) advantage: they are in the loss mask.
    assert train_mask(ep, False)[ep.turn_index == TURN1_TOKEN].sum() > 0
