"""The engine-agnostic two-turn driver: crop from the original, fallback, truncation after the JSON block, masks.

The model's turn-1 replies are scripted here (a random tiny model almost never emits a valid box), so the
driver's grounding → crop → turn-2 logic is exercised on known boxes; the real engines are tested elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from scripted import ScriptedEngine, box_reply

from mgpo_core.episodes import TURN1_TOKEN, TURN2_TOKEN
from mgpo_core.imaging import overview_size


def test_valid_box_crops_the_original_and_sends_it_as_second_image(tiny_bundle, tiny_cfg, synthetic_samples):
    s = synthetic_samples[0]
    w_in, h_in = overview_size(
        900, 600, min_pixels=tiny_cfg.rollout.min_pixels, max_pixels=tiny_cfg.rollout.max_pixels
    )
    eng = ScriptedEngine(
        tiny_bundle, tiny_cfg, [box_reply(0, 0, w_in // 4, h_in // 4)], "\\boxed{" + s.answer + "}"
    )
    (ep,) = eng.generate_episodes([s], n=1)
    assert ep.grounding.valid and ep.grounding.reason == "ok"
    # A quarter of the model image maps to a quarter of the ORIGINAL image (900x600), whatever the overview size.
    assert ep.crop_box == pytest.approx((0, 0, 225, 150), abs=2)
    assert not ep.truncated
    assert ep.crop_size is not None and ep.crop_size != ep.overview_size
    assert ep.image_grid_thw.shape == (2, 3)
    assert ep.pixel_values.shape[0] == int(ep.image_grid_thw.prod(dim=1).sum())
    turn2_req = eng.calls[1][0]
    assert turn2_req.pil_images[1].size == ep.crop_size
    assert ep.reward == 1.0


def test_invalid_box_falls_back_to_the_overview_and_says_so(tiny_bundle, tiny_cfg, synthetic_samples):
    s = synthetic_samples[1]
    eng = ScriptedEngine(tiny_bundle, tiny_cfg, ["no json here"], "\\boxed{Z}")
    (ep,) = eng.generate_episodes([s], n=1)
    assert not ep.grounding.valid and ep.grounding.reason == "no_json"
    assert ep.crop_box is None
    assert torch.equal(ep.image_grid_thw[0], ep.image_grid_thw[1])  # the overview is re-sent
    first_line = tiny_cfg.rollout.turn2_fallback_template.split("\n")[0]
    decoded = tiny_bundle.tokenizer.decode(ep.input_ids[ep.prompt_len :])
    assert first_line in decoded
    assert tiny_cfg.rollout.turn2_valid_template.split("\n")[0] not in decoded
    assert ep.reward == 0.0


def test_loss_mask_covers_exactly_the_generated_tokens_of_both_turns(
    tiny_bundle, tiny_cfg, synthetic_samples
):
    sp = tiny_bundle.special
    eng = ScriptedEngine(tiny_bundle, tiny_cfg, [box_reply(10, 10, 200, 150)], "It is \\boxed{A}")
    (ep,) = eng.generate_episodes([synthetic_samples[0]], n=1)
    mask = ep.loss_mask.bool()
    gen = (ep.turn_index == TURN1_TOKEN) | (ep.turn_index == TURN2_TOKEN)
    assert torch.equal(mask, gen)
    assert not mask[ep.mm_token_type_ids.bool()].any(), "image tokens must never be trained"
    assert not mask[: ep.prompt_len].any()
    ends = (ep.input_ids == sp.im_end) & mask
    assert int(ends.sum()) == 2, "each assistant turn's <|im_end|> is trained"
    # The inserted user turn between the two assistant turns is masked out.
    t1_last = int(torch.nonzero(ep.turn_index == TURN1_TOKEN).max())
    t2_first = int(torch.nonzero(ep.turn_index == TURN2_TOKEN).min())
    assert t2_first - t1_last > 1 and not mask[t1_last + 1 : t2_first].any()


def test_text_after_the_json_block_is_cut_and_im_end_forced(tiny_bundle, tiny_cfg, synthetic_samples):
    sp = tiny_bundle.special
    reply = box_reply(10, 10, 200, 150, tail="\nand then the model keeps talking about unrelated things")
    eng = ScriptedEngine(tiny_bundle, tiny_cfg, [reply], "\\boxed{B}")
    (ep,) = eng.generate_episodes([synthetic_samples[0]], n=1)
    assert ep.turn1_text.rstrip().endswith("```")
    assert "keeps talking" not in ep.turn1_text
    t1 = ep.input_ids[ep.turn_index == TURN1_TOKEN]
    assert int(t1[-1]) == sp.im_end
    # The forced <|im_end|> is part of the assistant turn (the MGPO mask) but was never sampled: no rollout
    # log-prob, and marked forced.
    last = int(torch.nonzero(ep.turn_index == TURN1_TOKEN).max())
    assert ep.loss_mask[last] == 1 and torch.isnan(ep.rollout_logprobs[last]) and bool(ep.forced[last])


@pytest.mark.parametrize("train_forced", [None, False, True], ids=["default", "false", "true"])
def test_forced_im_end_enters_the_trainers_loss_only_with_train_forced_tokens(
    tiny_bundle, tiny_cfg, synthetic_samples, train_forced
):
    """What the trainer's batch trains, per ``algorithm.train_forced_tokens``: the default (false) keeps the forced
    ``<|im_end|>`` as context; true trains it like a sampled token. Every sampled token is trained either way."""
    from mgpo_core.config import load_config
    from mgpo_core.training.update import UpdateSettings

    sp = tiny_bundle.special
    reply = box_reply(10, 10, 200, 150, tail="\nand then the model keeps talking about unrelated things")
    (ep,) = ScriptedEngine(tiny_bundle, tiny_cfg, [reply], "\\boxed{B}").generate_episodes(
        [synthetic_samples[0]], n=1
    )
    sets = [] if train_forced is None else [f"algorithm.train_forced_tokens={str(train_forced).lower()}"]
    settings = UpdateSettings.from_config(load_config("tiny-cpu", sets), sp)
    trained = settings.collate([ep], tiny_bundle.model, torch.device("cpu"), torch.float32).loss_mask[0]
    last = int(torch.nonzero(ep.turn_index == TURN1_TOKEN).max())
    assert int(ep.input_ids[last]) == sp.im_end and bool(ep.forced[last])
    assert trained[last] == (1 if train_forced else 0)
    sampled = ep.loss_mask.bool() & ~ep.forced
    assert sampled.sum() > 2 and (trained[sampled] == 1).all() and (trained[~ep.loss_mask.bool()] == 0).all()


def test_turn1_cut_by_length_gets_a_forced_end_and_turn2_still_happens(
    tiny_bundle, tiny_cfg, synthetic_samples
):
    eng = ScriptedEngine(tiny_bundle, tiny_cfg, ["I am still thinking"], "\\boxed{A}", end_turn1=False)
    (ep,) = eng.generate_episodes([synthetic_samples[0]], n=1)
    assert ep.turn_length(TURN2_TOKEN) > 0
    assert ep.finish_reasons[0] == "length"


def test_groups_and_n_samples_per_prompt(tiny_bundle, tiny_cfg, synthetic_samples):
    replies = [box_reply(10, 10, 200, 150), "nothing", "```json\n[]\n```", box_reply(0, 0, 5, 5)] * 2
    eng = ScriptedEngine(tiny_bundle, tiny_cfg, replies, "\\boxed{A}")
    eps = eng.generate_episodes(synthetic_samples[:2], n=4)
    assert [e.group for e in eps] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [e.grounding.reason for e in eps[:4]] == ["ok", "no_json", "empty_list", "too_small"]
    # Turn 1 and turn 2 were each ONE batched call across the whole batch.
    assert len(eng.calls) == 2 and len(eng.calls[0]) == 2 and len(eng.calls[1]) == 8


def test_response_cap_truncates_without_cutting_an_image(tiny_bundle, tiny_cfg, synthetic_samples):
    from mgpo_core.config import load_config

    cfg = load_config("tiny-cpu", ["rollout.max_response_tokens=40"])
    eng = ScriptedEngine(tiny_bundle, cfg, [box_reply(10, 10, 200, 150)], "\\boxed{A}")
    (ep,) = eng.generate_episodes([synthetic_samples[0]], n=1)
    assert ep.truncated
    assert ep.length <= ep.prompt_len + 40
    # Whatever was kept, image spans are whole and the pixel values match them.
    n_pad = int((ep.input_ids == tiny_bundle.special.image_pad).sum())
    assert n_pad == int(ep.image_grid_thw.prod(dim=1).sum()) // 4
