"""The Hugging Face rollout engine on the real tiny Qwen2.5-VL: batching, guarding, determinism, RNG isolation."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_sampled_episodes_have_consistent_structure(hf_engine, tiny_bundle, synthetic_samples):
    eps = hf_engine.generate_episodes(synthetic_samples[:2], n=2, seed=1)
    sp = tiny_bundle.special
    assert [e.group for e in eps] == [0, 0, 1, 1]
    banned = set(sp.non_text_ids())
    for ep in eps:
        gen = ep.input_ids[ep.loss_mask.bool()].tolist()
        assert not banned & set(gen), "the engine sampled an id outside the text vocabulary"
        assert ep.image_grid_thw.shape == (2, 3)
        n_pad = int((ep.input_ids == sp.image_pad).sum())
        assert n_pad == int(ep.image_grid_thw.prod(dim=1).sum()) // 4 == int(ep.mm_token_type_ids.sum())
        assert ep.pixel_values.shape[0] == int(ep.image_grid_thw.prod(dim=1).sum())
        assert ep.reward in (0.0, 1.0)
        assert ep.turn_length(1) <= hf_engine.settings.max_new_tokens_turn1 + 1
        sampled = torch.isfinite(ep.rollout_logprobs)
        assert sampled.sum() > 0 and (ep.rollout_logprobs[sampled] <= 0).all()


def test_same_seed_same_episodes_and_global_rng_untouched(hf_engine, synthetic_samples):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = hf_engine.generate_episodes(synthetic_samples[:1], n=2, seed=7)
    assert torch.equal(torch.get_rng_state(), before), "rollouts must not consume the trainer's RNG"
    b = hf_engine.generate_episodes(synthetic_samples[:1], n=2, seed=7)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))


def test_batched_greedy_equals_one_prompt_at_a_time(hf_engine, synthetic_samples):
    batched = hf_engine.generate_episodes(synthetic_samples, n=1, greedy=True)
    single = [hf_engine.generate_episodes([s], n=1, greedy=True)[0] for s in synthetic_samples]
    for x, y in zip(batched, single, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
