"""Independent checks against other implementations of the same pieces of the method.

- the loss mask against Hugging Face's assistant-token mask from a chat template with ``{% generation %}`` tags;
- log-probs and entropies against TRL's ``selective_log_softmax`` / ``entropy_from_logits``;
- the MGPO loss against TRL's GRPO loss code (``GRPOTrainer._compute_loss``, token-mean "bnpo" aggregation,
  k3 KL, entropy bonus) run on the same tensors;
- the coordinate mapping at pixel level: a target located by colour in the overview, boxed there, mapped and
  cropped, must contain the same target located by colour in the original.
"""

from __future__ import annotations

import types
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scripted import ScriptedEngine, box_reply

from mgpo_core.algorithms import LossCoefficients, mgpo_loss
from mgpo_core.grounding import map_box_to_original
from mgpo_core.imaging import crop_and_enlarge, resize_for_model
from mgpo_core.logprobs import entropy_from_logits, logprobs_from_logits

GENERATION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def test_loss_mask_matches_hf_assistant_mask_from_a_generation_template(
    tiny_bundle, tiny_cfg, synthetic_samples
):
    tok, sp = tiny_bundle.tokenizer, tiny_bundle.special
    reply1, reply2 = box_reply(10, 10, 200, 150), "The enlarged area shows it. \\boxed{C}"
    eng = ScriptedEngine(tiny_bundle, tiny_cfg, [reply1], reply2)
    (ep,) = eng.generate_episodes(synthetic_samples[:1], n=1)
    s = ep.sample
    t = eng.prompts.templates
    messages = [
        {"role": "system", "content": [{"type": "text", "text": t.system_prompt}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t.turn1_text(s)}]},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t.turn2_text(s, True)}]},
        {"role": "assistant", "content": reply2},
    ]
    hf = tok.apply_chat_template(
        messages,
        chat_template=GENERATION_TEMPLATE,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    hf_ids = torch.tensor(hf["input_ids"])
    hf_mask = torch.tensor(hf["assistant_masks"]).bool()
    ours_trained = tok.decode(ep.input_ids[ep.loss_mask.bool()])
    assert ours_trained == tok.decode(hf_ids[hf_mask]) == reply1 + "<|im_end|>" + reply2 + "<|im_end|>"
    # Everything else (prompt, inserted turn, images) is the same text, with image pads collapsed to one.
    collapse = lambda ids: tok.decode(ids).replace("<|image_pad|>", "").rstrip("\n")  # noqa: E731
    assert collapse(ep.input_ids) == collapse(hf_ids)
    assert int((hf_ids == sp.image_pad).sum()) == 2


def test_logprobs_and_entropy_match_trl():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 57, generator=g) * 3
    ids = torch.randint(0, 57, (3, 11), generator=g)
    ours = logprobs_from_logits(logits, ids)[:, 1:]
    theirs = trl_utils.selective_log_softmax(logits[:, :-1], ids[:, 1:])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        entropy_from_logits(logits)[:, 1:], trl_utils.entropy_from_logits(logits[:, :-1])
    )


class _OneProcess:
    """Single-process stand-in for accelerate's collective ops (gather/reduce are identities on one rank)."""

    sync_gradients = True
    num_processes = 1

    def gather(self, x):  # noqa: ANN001, ANN201
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):  # noqa: ANN001, ANN201
        return x


def _trl_grpo_loss(logp, old, ref, adv, mask, ent, *, beta, eps, entropy_coef):  # noqa: ANN001
    """TRL's own ``GRPOTrainer._compute_loss`` evaluated on given per-token tensors."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    me = types.SimpleNamespace(
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type="bnpo",
        epsilon_low=eps,
        epsilon_high=eps,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=entropy_coef > 0,
        use_adaptive_entropy=False,
        entropy_coef=entropy_coef,
        model=types.SimpleNamespace(training=True),
        accelerator=_OneProcess(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, ent, None),
    )
    b, t = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    return grpo.GRPOTrainer._compute_loss(me, None, inputs), me._metrics["train"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgpo_loss_matches_trl_grpo_loss_on_the_same_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 13
    logp = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(b, t, generator=g) * 0.3  # some ratios fall outside the clip range
    ref = logp.detach() + torch.randn(b, t, generator=g) * 0.2
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).long()
    ent = torch.rand(b, t, generator=g) * 2
    coefs = LossCoefficients(kl_coef=0.01, entropy_coef=0.001, clip_low=0.2, clip_high=0.2)
    ours, metrics = mgpo_loss(logp, old, ref, adv, mask.float(), ent, coefs)
    theirs, trl_metrics = _trl_grpo_loss(
        logp, old, ref, adv, mask, ent, beta=0.01, eps=0.2, entropy_coef=0.001
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logp)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-7, rtol=1e-5)
    assert metrics["loss/kl"] == pytest.approx(trl_metrics["kl"][0], rel=1e-5)
    assert metrics["actor/clip_frac"] == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-6)


def _colour_bbox(img: Image.Image, colour: tuple[int, int, int], tol: int = 40) -> tuple[int, int, int, int]:
    a = np.asarray(img).astype(int)
    hit = (np.abs(a - np.array(colour)).sum(-1) < tol).nonzero()
    return int(hit[1].min()), int(hit[0].min()), int(hit[1].max()) + 1, int(hit[0].max()) + 1


@pytest.mark.parametrize("size", [(3840, 2160), (1000, 700), (7680, 4320), (1600, 3000)])
def test_box_found_in_the_overview_crops_the_same_target_from_the_original(size):
    w, h = size
    original = Image.new("RGB", (w, h), (200, 200, 200))
    tx, ty, side = int(w * 0.61), int(h * 0.27), max(40, w // 40)
    ImageDraw.Draw(original).rectangle((tx, ty, tx + side - 1, ty + side - 1), fill=(255, 0, 0))
    overview = resize_for_model(
        original, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28, resample="nearest"
    )
    # A "perfect" model boxes the red square in the image it saw, with a small margin.
    x1, y1, x2, y2 = _colour_bbox(overview, (255, 0, 0))
    model_box = (max(0, x1 - 2), max(0, y1 - 2), min(overview.width, x2 + 2), min(overview.height, y2 + 2))
    crop_box = map_box_to_original(model_box, overview.size, original.size)
    assert crop_box[0] <= tx and crop_box[1] <= ty
    assert crop_box[2] >= tx + side and crop_box[3] >= ty + side
    # ... and not much more than the target: margin 2 model px + rounding ≈ 3 model px each side.
    scale = w / overview.width
    assert crop_box[2] - crop_box[0] <= side + 2 * 4 * scale
    crop = crop_and_enlarge(original, crop_box, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    cx1, cy1, cx2, cy2 = _colour_bbox(crop, (255, 0, 0))
    assert (cx2 - cx1) * (cy2 - cy1) > 0.5 * crop.width * crop.height, (
        "the enlarged crop is mostly the target"
    )
