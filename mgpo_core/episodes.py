"""The two-turn episode as plain data: prompt token ids, the loss mask over model-generated tokens, both images.

An episode is ``system + user(overview image, question) + assistant(turn 1) + user(second image, question,
choices) + assistant(turn 2)``. Only the tokens the model generated in the two assistant turns (each one's
``<|im_end|>`` included) enter the loss; the prompt, the inserted user turn and every image token are masked out
(METHOD.md §2). Prompt ids are assembled from explicit special-token ids plus text encoded with special-token
parsing OFF, so a question that contains ``<|im_start|>`` can never inject a control token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from mgpo_core.data.schema import Sample, format_choices
from mgpo_core.grounding import GroundingResult
from mgpo_core.modeling.loading import SpecialTokens

# turn_index values: which part of the conversation a token belongs to.
ENV_TOKEN = 0
TURN1_TOKEN = 1
TURN2_TOKEN = 2


@dataclass(frozen=True)
class PromptTemplates:
    """The texts of the fixed two-turn conversation (the SFT-free "cold start" template)."""

    system_prompt: str
    turn1_template: str
    turn2_valid_template: str
    turn2_fallback_template: str
    choices_header: str = "The choices are listed below:"

    @classmethod
    def from_config(cls, rollout: Any) -> PromptTemplates:
        return cls(
            system_prompt=rollout.system_prompt,
            turn1_template=rollout.turn1_template,
            turn2_valid_template=rollout.turn2_valid_template,
            turn2_fallback_template=rollout.turn2_fallback_template,
            choices_header=rollout.choices_header,
        )

    def turn1_text(self, sample: Sample) -> str:
        # The answer choices are NOT shown in turn 1 (METHOD.md §1.2).
        return self.turn1_template.format(question=sample.question)

    def turn2_text(self, sample: Sample, valid_box: bool) -> str:
        choices = f"{self.choices_header}\n{format_choices(sample.choices)}"
        template = self.turn2_valid_template if valid_box else self.turn2_fallback_template
        return template.format(question=sample.question, choices=choices)


@dataclass
class ImageInput:
    """One image as the model consumes it: ``pixel_values`` (N, C·T·P·P) patches and ``grid_thw`` (3,)."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    size: tuple[int, int]
    merge_size: int = 2

    @property
    def n_tokens(self) -> int:
        """Visual tokens in the LLM sequence: t·h·w / merge² (one token per 28×28 pixels for Qwen2.5-VL)."""
        return int(self.grid_thw.prod().item()) // (self.merge_size**2)


def encode_image(image_processor: Any, image: Image.Image) -> ImageInput:
    """Run the model's image processor on an image that is ALREADY at its model size (multiples of 28).

    Our own resize (``imaging.resize_for_model``) decides the size; the processor must not resize again, so the
    result has exactly ``w·h/28²`` visual tokens.
    """
    out = image_processor(images=[image], return_tensors="pt")
    grid = out["image_grid_thw"][0].to(torch.long)
    merge = int(getattr(image_processor, "merge_size", 2))
    patch = int(getattr(image_processor, "patch_size", 14))
    expected = (image.height // (patch * merge) * merge, image.width // (patch * merge) * merge)
    if (int(grid[1]), int(grid[2])) != expected:
        raise ValueError(
            f"the image processor resized a {image.width}x{image.height} image to grid {tuple(grid.tolist())}; "
            "widen its min_pixels/max_pixels so that it keeps the size chosen by imaging.resize_for_model"
        )
    return ImageInput(out["pixel_values"], grid, (image.width, image.height), merge)


class PromptBuilder:
    """Token ids of the two user turns, with image placeholders expanded to the image's token count."""

    def __init__(self, tokenizer: Any, special: SpecialTokens, templates: PromptTemplates) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self.templates = templates
        self._nl = self.text_ids("\n")

    def text_ids(self, text: str) -> list[int]:
        """Encode plain text with special-token parsing OFF (user text cannot smuggle in control tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def image_ids(self, n_tokens: int) -> list[int]:
        s = self.special
        return [s.vision_start] + [s.image_pad] * n_tokens + [s.vision_end]

    def _turn(self, role: str, body: list[int]) -> list[int]:
        s = self.special
        return [s.im_start, *self.text_ids(f"{role}\n"), *body, s.im_end, *self._nl]

    def assistant_header(self) -> list[int]:
        return [self.special.im_start, *self.text_ids("assistant\n")]

    def turn1_prompt(self, sample: Sample, image_tokens: int) -> list[int]:
        """``<|im_start|>system…<|im_end|>\\n<|im_start|>user\\n<image>question…<|im_end|>\\n<|im_start|>assistant\\n``."""
        system = self._turn("system", self.text_ids(self.templates.system_prompt))
        user = self._turn(
            "user", self.image_ids(image_tokens) + self.text_ids(self.templates.turn1_text(sample))
        )
        return system + user + self.assistant_header()

    def turn2_prompt(self, sample: Sample, image_tokens: int, valid_box: bool) -> list[int]:
        """Continuation after turn 1's ``<|im_end|>``: ``\\n<|im_start|>user\\n<image>…<|im_end|>\\n<|im_start|>assistant\\n``."""
        body = self.image_ids(image_tokens) + self.text_ids(self.templates.turn2_text(sample, valid_box))
        return self._nl + self._turn("user", body) + self.assistant_header()


@dataclass
class Episode:
    """One two-turn rollout of one sample, as plain tensors (the trainer and the evaluator share it).

    Shapes: ``input_ids``, ``loss_mask``, ``turn_index``, ``mm_token_type_ids``, ``rollout_logprobs`` are (L,);
    ``pixel_values`` is (N1 + N2, D) for the two images in order; ``image_grid_thw`` is (n_images, 3).
    ``rollout_logprobs`` holds the engine's log-prob of each token it sampled (NaN elsewhere, including a
    forced ``<|im_end|>``) for the train-vs-rollout gap. ``forced`` (L,) bool marks the assistant-turn tokens
    the environment appended rather than the model sampled (turn 1's ``<|im_end|>`` after a cut); they are in
    ``loss_mask`` (the MGPO mask of the assistant turns) and whether they are trained on is the trainer's
    decision (``algorithm.train_forced_tokens``, see :func:`train_mask`).
    """

    sample: Sample
    group: int
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    turn_index: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    rollout_logprobs: torch.Tensor
    prompt_len: int
    turn1_text: str
    turn2_text: str
    grounding: GroundingResult
    crop_box: tuple[int, int, int, int] | None
    overview_size: tuple[int, int]
    original_size: tuple[int, int]
    crop_size: tuple[int, int] | None
    forced: torch.Tensor | None = None
    reward: float = 0.0
    truncated: bool = False
    finish_reasons: tuple[str, str] = ("stop", "stop")
    turns: int = 2
    """Assistant turns of the conversation: 2 for MGPO, 1 for the single-turn GRPO baseline (no turn 2)."""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def turn_length(self, turn: int) -> int:
        return int((self.turn_index == turn).sum().item())

    @property
    def valid_box(self) -> bool:
        return self.grounding.valid

    @property
    def turn2_answered(self) -> bool:
        """Turn 2 generated at least one token (False when the response budget ran out before it)."""
        return self.turn_length(TURN2_TOKEN) > 0


def train_mask(ep: Episode, train_forced: bool = True) -> torch.Tensor:
    """The tokens the loss is computed on (L,): ``loss_mask``, less the forced tokens unless ``train_forced``.

    A forced token was never sampled: it has no behaviour log-prob, and its PPO ratio is not an importance
    ratio of anything the policy did. With ``train_forced=False`` (the default of ``algorithm.train_forced_tokens``)
    it is context only: no policy, KL or entropy term and no count in the token-mean. ``True`` is the reference's
    behaviour (trained like a sampled token).
    """
    if train_forced or ep.forced is None or not bool(ep.forced.any()):
        return ep.loss_mask
    return ep.loss_mask * (~ep.forced).to(ep.loss_mask.dtype)


def image_spans(input_ids: torch.Tensor, special: SpecialTokens) -> list[tuple[int, int]]:
    """``[(start, end)]`` of every ``<|vision_start|> … <|vision_end|>`` span (end exclusive)."""
    ids = input_ids.tolist()
    spans, start = [], None
    for i, t in enumerate(ids):
        if t == special.vision_start:
            start = i
        elif t == special.vision_end and start is not None:
            spans.append((start, i + 1))
            start = None
    if start is not None:  # an unterminated span runs to the end
        spans.append((start, len(ids)))
    return spans


def safe_cut(input_ids: torch.Tensor, max_len: int, special: SpecialTokens) -> int:
    """The largest cut ``≤ max_len`` that does not fall inside an image span (METHOD.md §5, first pitfall).

    Cutting through ``<|image_pad|>`` tokens breaks the feature count of the vision tower; a cut inside a span
    moves back to before that span's ``<|vision_start|>``.
    """
    if max_len >= input_ids.numel():
        return int(input_ids.numel())
    for start, end in image_spans(input_ids, special):
        if start < max_len < end:
            return start
    return max_len


def assemble_episode(
    *,
    sample: Sample,
    group: int,
    special: SpecialTokens,
    prompt1: list[int],
    gen1: list[int],
    gen1_logprobs: Sequence[float] | None,
    forced_end1: bool,
    prompt2: list[int],
    gen2: list[int],
    gen2_logprobs: Sequence[float] | None,
    images: list[ImageInput],
    max_total_len: int | None,
    **meta: Any,
) -> Episode:
    """Concatenate the parts, build the loss mask and per-token bookkeeping, and truncate safely.

    ``forced_end1`` means turn 1's ``<|im_end|>`` was appended by the environment (reply cut after the JSON
    block, or cut by length); it is in ``loss_mask`` and flagged in ``forced``, and has no rollout log-prob.
    """
    parts: list[tuple[list[int], int, bool, Sequence[float] | None, bool]] = [
        (prompt1, ENV_TOKEN, False, None, False),
        (gen1, TURN1_TOKEN, True, gen1_logprobs, False),
        ([special.im_end] if forced_end1 else [], TURN1_TOKEN, True, None, True),
        (prompt2, ENV_TOKEN, False, None, False),
        (gen2, TURN2_TOKEN, True, gen2_logprobs, False),
    ]
    ids: list[int] = []
    mask: list[float] = []
    forced: list[bool] = []
    turn: list[int] = []
    lps: list[float] = []
    for toks, which, trained, lp, env_forced in parts:
        ids.extend(toks)
        forced.extend([env_forced] * len(toks))
        mask.extend([1.0 if trained else 0.0] * len(toks))
        turn.extend([which] * len(toks))
        lps.extend(list(lp) if lp is not None else [math.nan] * len(toks))
    input_ids = torch.tensor(ids, dtype=torch.long)
    truncated_upstream = bool(meta.pop("truncated", False))
    cut = input_ids.numel() if max_total_len is None else safe_cut(input_ids, max_total_len, special)
    truncated = cut < input_ids.numel()
    input_ids = input_ids[:cut]
    n_spans = len([s for s in image_spans(input_ids, special) if s[1] <= cut])
    kept = images[:n_spans]
    return Episode(
        sample=sample,
        group=group,
        input_ids=input_ids,
        loss_mask=torch.tensor(mask[:cut], dtype=torch.float32),
        turn_index=torch.tensor(turn[:cut], dtype=torch.int8),
        mm_token_type_ids=(input_ids == special.image_pad).to(torch.int32),
        pixel_values=torch.cat([im.pixel_values for im in kept]) if kept else torch.empty(0),
        image_grid_thw=torch.stack([im.grid_thw for im in kept])
        if kept
        else torch.empty(0, 3, dtype=torch.long),
        rollout_logprobs=torch.tensor(lps[:cut], dtype=torch.float32),
        forced=torch.tensor(forced[:cut], dtype=torch.bool),
        prompt_len=len(prompt1),
        truncated=truncated or truncated_upstream,
        **meta,
    )
