"""The direct single-turn baseline: one image at the full-resolution budget, the question and its choices, one
greedy answer, through any rollout engine's batched ``_generate``.

This is the comparison users run MGPO against (no grounding turn, no crop). The image goes through the same
size rule as an overview (`resize_for_model`) but with ``max_pixels`` = the direct budget, which defaults to
the model's own maximum (`model_max_pixels`); the prompt is built from explicit special-token ids like the
MGPO turns (`PromptBuilder`), so question text cannot inject control tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mgpo_core.data.schema import Sample, format_choices
from mgpo_core.episodes import encode_image
from mgpo_core.imaging import model_max_pixels, open_image, resize_for_model
from mgpo_core.rollout.base import GenerationRequest, RolloutEngine, SamplingSpec

__all__ = ["DirectOutput", "DirectPrompt", "direct_prompt_ids", "generate_direct", "model_max_pixels"]


@dataclass(frozen=True)
class DirectPrompt:
    """Texts of the direct prompt: ``template`` is `str.format`-ed with {question} and {choices}."""

    system_prompt: str
    template: str
    choices_header: str = "The choices are listed below:"

    def user_text(self, sample: Sample) -> str:
        choices = f"{self.choices_header}\n{format_choices(sample.choices)}"
        return self.template.format(question=sample.question, choices=choices)


@dataclass
class DirectOutput:
    """One direct answer: decoded text (special tokens dropped), token counts, the image as the model saw it.

    ``image_size`` is ``(W, H)`` after resizing; ``visual_tokens`` = W·H / 28²; ``prompt_tokens`` counts
    them too.
    """

    sample: Sample
    text: str
    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    visual_tokens: int
    image_size: tuple[int, int]
    original_size: tuple[int, int]


def direct_prompt_ids(
    engine: RolloutEngine, prompt: DirectPrompt, sample: Sample, image_tokens: int
) -> list[int]:
    """The direct prompt's token ids: system turn, user turn (image, question, choices), assistant header.

    ``<|im_start|>system…<|im_end|>\\n<|im_start|>user\\n<image>…<|im_end|>\\n<|im_start|>assistant\\n``
    """
    from mgpo_core.rollout.single_turn import single_turn_prompt

    return single_turn_prompt(engine, prompt.system_prompt, prompt.user_text(sample), image_tokens)


def generate_direct(
    engine: RolloutEngine,
    samples: Sequence[Sample],
    prompt: DirectPrompt,
    *,
    max_new_tokens: int,
    min_pixels: int,
    max_pixels: int | None = None,
    resample: str = "bicubic",
    max_image_pixels: int = 100_000_000,
) -> list[DirectOutput]:
    """Greedy single-turn answers for ``samples``, one batched ``engine._generate`` call.

    ``max_pixels`` None = :func:`model_max_pixels` of the engine's image processor (the full-resolution
    budget). Originals are opened one at a time and closed; only the resized images live for the call.
    """
    budget = model_max_pixels(engine.image_processor) if max_pixels is None else max_pixels
    if budget < min_pixels:
        raise ValueError(
            f"direct max_pixels={budget} is below min_pixels={min_pixels}; raise "
            "evaluation.direct_max_pixels or lower rollout.min_pixels"
        )
    requests, meta = [], []
    for sample in samples:
        original = open_image(sample.image_path, max_image_pixels=max_image_pixels)
        try:
            image = resize_for_model(original, min_pixels=min_pixels, max_pixels=budget, resample=resample)
            original_size = original.size
        finally:
            original.close()
        encoded = encode_image(engine.image_processor, image)
        ids = direct_prompt_ids(engine, prompt, sample, encoded.n_tokens)
        requests.append(GenerationRequest(ids, [encoded], [image], max_new_tokens))
        meta.append((sample, len(ids), encoded.n_tokens, image.size, original_size))
    if not requests:
        return []
    results = engine._generate(requests, SamplingSpec(max_new_tokens, greedy=True, seed=0), 1)
    outputs = []
    for (sample, n_prompt, n_visual, size, original_size), res in zip(meta, results, strict=True):
        r = res[0]
        outputs.append(
            DirectOutput(
                sample=sample,
                text=engine.tokenizer.decode(r.token_ids, skip_special_tokens=True),
                finish_reason=r.finish_reason,
                generated_tokens=len(r.token_ids),
                prompt_tokens=n_prompt,
                visual_tokens=n_visual,
                image_size=size,
                original_size=original_size,
            )
        )
    return outputs
