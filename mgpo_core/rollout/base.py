"""The rollout-engine interface and the engine-agnostic two-turn driver (turn 1 → parse → crop → turn 2).

An engine only implements batched raw generation (``_generate``) and weight sync; this module owns the MGPO
episode logic so the vLLM and Hugging Face engines produce the same episodes from the same token streams.
Originals are opened one at a time and closed again: a batch never holds full-resolution images in memory.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from mgpo_core.data.schema import Sample
from mgpo_core.episodes import (
    Episode,
    ImageInput,
    PromptBuilder,
    PromptTemplates,
    assemble_episode,
    encode_image,
)
from mgpo_core.grounding import GroundingOptions, GroundingResult, map_box_to_original, parse_grounding_box
from mgpo_core.imaging import crop_and_enlarge, open_image, resize_for_model
from mgpo_core.modeling.loading import SpecialTokens
from mgpo_core.reward import episode_answer_reward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample one turn. ``greedy`` overrides temperature/top-p (evaluation)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One prompt: token ids with expanded image placeholders, and the processed images in order."""

    prompt_ids: list[int]
    images: list[ImageInput]
    pil_images: list[Image.Image]
    max_new_tokens: int


@dataclass
class GenerationResult:
    """Generated token ids (stop token included when the model emitted it) and their log-probs."""

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)
class RolloutSettings:
    """What the driver needs from the config (``rollout`` + ``grounding`` sections)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens_turn1: int = 8192
    max_new_tokens_turn2: int = 8192
    max_response_tokens: int = 12192
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    overview_resample: str = "bicubic"
    crop_resample: str = "nearest"
    max_image_pixels: int = 100_000_000
    truncate_after_block: bool = True
    grounding: GroundingOptions = field(default_factory=GroundingOptions)

    @classmethod
    def from_config(cls, cfg) -> RolloutSettings:  # noqa: ANN001 - MGPOConfig, kept import-light
        r, g = cfg.rollout, cfg.grounding
        return cls(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens_turn1=r.max_new_tokens_turn1,
            max_new_tokens_turn2=r.max_new_tokens_turn2,
            max_response_tokens=r.max_response_tokens,
            min_pixels=r.min_pixels,
            max_pixels=r.max_pixels,
            overview_resample=r.overview_resample,
            crop_resample=r.crop_resample,
            max_image_pixels=cfg.data.max_image_pixels,
            truncate_after_block=g.truncate_after_block,
            grounding=GroundingOptions(
                coord_mode=g.coord_mode,
                accept_float=g.accept_float,
                accept_unfenced=g.accept_unfenced,
                clamp_tolerance=g.clamp_tolerance,
                min_side=g.min_side,
                max_aspect=g.max_aspect,
            ),
        )


class RolloutEngine(abc.ABC):
    """Generate batches of two-turn MGPO episodes; receive the trainer's weights; sleep/wake on GPUs."""

    name = "base"

    def __init__(
        self,
        tokenizer,
        image_processor,
        special: SpecialTokens,
        templates: PromptTemplates,
        settings: RolloutSettings,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.special = special
        self.settings = settings
        self.prompts = PromptBuilder(tokenizer, special, templates)

    # -- what an engine implements ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _generate(
        self, requests: Sequence[GenerationRequest], spec: SamplingSpec, n: int
    ) -> list[list[GenerationResult]]:
        """Return ``n`` samples for each request (``result[i][j]`` = sample j of request i)."""

    @abc.abstractmethod
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's current weights (Hugging Face parameter names) without restarting the engine."""

    def sleep(self) -> None:  # noqa: B027 - optional hook: engines without device memory do nothing
        """Free accelerator memory while the trainer runs (no-op where there is nothing to free)."""

    def wake(self) -> None:  # noqa: B027
        """Re-acquire accelerator memory before the next rollout."""

    def close(self) -> None:  # noqa: B027
        """Release the engine's resources."""

    # -- the MGPO episode logic ------------------------------------------------------------------------------
    def generate_episodes(
        self,
        samples: Sequence[Sample],
        n: int | None = None,
        *,
        greedy: bool = False,
        seed: int | None = None,
    ) -> list[Episode]:
        """Roll out ``n`` two-turn episodes per sample; ``episode.group`` is the sample's index in ``samples``.

        Turn 1 and turn 2 are each ONE batched generation call across the whole batch.
        """
        st = self.settings
        n = st.n if n is None else n
        overviews: list[tuple[Image.Image, ImageInput, tuple[int, int]]] = []
        for s in samples:
            original = open_image(s.image_path, max_image_pixels=st.max_image_pixels)
            overview = resize_for_model(
                original, min_pixels=st.min_pixels, max_pixels=st.max_pixels, resample=st.overview_resample
            )
            overviews.append((overview, encode_image(self.image_processor, overview), original.size))
            original.close()

        prompts1 = [
            self.prompts.turn1_prompt(s, img.n_tokens)
            for s, (_, img, _) in zip(samples, overviews, strict=True)
        ]
        spec1 = SamplingSpec(st.max_new_tokens_turn1, st.temperature, st.top_p, greedy, seed)
        reqs1 = [
            GenerationRequest(p, [img], [ov], st.max_new_tokens_turn1)
            for p, (ov, img, _) in zip(prompts1, overviews, strict=True)
        ]
        out1 = self._generate(reqs1, spec1, n)

        pending: list[dict] = []
        for gi, (sample, (overview, img, orig_size)) in enumerate(zip(samples, overviews, strict=True)):
            for res in out1[gi]:
                pending.append(self._after_turn1(gi, sample, prompts1[gi], overview, img, orig_size, res))

        reqs2 = []
        for p in pending:
            budget = st.max_response_tokens - len(p["gen1"]) - int(p["forced_end1"]) - len(p["prompt2"])
            reqs2.append(
                GenerationRequest(
                    p["prompt1"]
                    + p["gen1"]
                    + ([self.special.im_end] if p["forced_end1"] else [])
                    + p["prompt2"],
                    [p["img"], p["img2"]],
                    [p["overview"], p["second_pil"]],
                    max(0, min(st.max_new_tokens_turn2, budget)),
                )
            )
        spec2 = SamplingSpec(
            st.max_new_tokens_turn2, st.temperature, st.top_p, greedy, None if seed is None else seed + 1
        )
        runnable = [i for i, r in enumerate(reqs2) if r.max_new_tokens > 0]
        out2: dict[int, GenerationResult] = {}
        if runnable:
            results = self._generate([reqs2[i] for i in runnable], spec2, 1)
            out2 = {i: res[0] for i, res in zip(runnable, results, strict=True)}

        episodes = []
        for i, p in enumerate(pending):
            r2 = out2.get(i, GenerationResult([], [], "length"))
            text2 = self.tokenizer.decode(r2.token_ids, skip_special_tokens=True)
            ep = assemble_episode(
                sample=p["sample"],
                group=p["group"],
                special=self.special,
                prompt1=p["prompt1"],
                gen1=p["gen1"],
                gen1_logprobs=p["gen1_lp"],
                forced_end1=p["forced_end1"],
                prompt2=p["prompt2"],
                gen2=r2.token_ids,
                gen2_logprobs=r2.logprobs,
                images=[p["img"], p["img2"]],
                max_total_len=len(p["prompt1"]) + st.max_response_tokens,
                turn1_text=p["text1"],
                turn2_text=text2,
                grounding=p["grounding"],
                crop_box=p["crop_box"],
                overview_size=p["overview"].size,
                original_size=p["orig_size"],
                crop_size=p["second_pil"].size if p["crop_box"] else None,
                finish_reasons=(p["finish1"], r2.finish_reason),
                truncated=i not in out2,
            )
            ep.reward = episode_answer_reward(text2, p["sample"].answer, turn2_ran=ep.turn2_answered)
            episodes.append(ep)
        return episodes

    def _after_turn1(
        self,
        group: int,
        sample: Sample,
        prompt1: list[int],
        overview: Image.Image,
        img: ImageInput,
        orig_size: tuple[int, int],
        res: GenerationResult,
    ) -> dict:
        """Parse turn 1, optionally cut it after the JSON block, crop the ORIGINAL, and build the turn-2 prompt."""
        st, sp = self.settings, self.special
        gen1 = list(res.token_ids)
        lp1 = list(res.logprobs) if res.logprobs is not None else None
        ended = bool(gen1) and gen1[-1] == sp.im_end
        body = gen1[:-1] if ended else gen1
        text1 = self.tokenizer.decode(body, skip_special_tokens=True)
        g = parse_grounding_box(text1, overview.width, overview.height, st.grounding)
        forced_end = not ended
        if st.truncate_after_block and g.block_end is not None and g.block_end < len(text1.rstrip()):
            keep = self._token_prefix_covering(body, g.block_end)
            if keep < len(body):
                body, gen1 = body[:keep], body[:keep]
                lp1 = lp1[:keep] if lp1 is not None else None
                text1 = self.tokenizer.decode(body, skip_special_tokens=True)
                forced_end = True
        crop_box = None
        second_pil, img2 = overview, img
        if g.valid and g.box is not None:
            crop_box = map_box_to_original(g.box, overview.size, orig_size)
            original = open_image(sample.image_path, max_image_pixels=st.max_image_pixels)
            try:
                second_pil = crop_and_enlarge(
                    original,
                    crop_box,
                    min_pixels=st.min_pixels,
                    max_pixels=st.max_pixels,
                    resample=st.crop_resample,
                )
            finally:
                original.close()
            img2 = encode_image(self.image_processor, second_pil)
        prompt2 = self.prompts.turn2_prompt(sample, img2.n_tokens, valid_box=crop_box is not None)
        return {
            "group": group,
            "sample": sample,
            "prompt1": prompt1,
            "gen1": gen1,
            "gen1_lp": lp1,
            "forced_end1": forced_end,
            "finish1": res.finish_reason,
            "text1": text1,
            "grounding": g,
            "crop_box": crop_box,
            "overview": overview,
            "img": img,
            "img2": img2,
            "second_pil": second_pil,
            "orig_size": orig_size,
            "prompt2": prompt2,
        }

    def _token_prefix_covering(self, tokens: list[int], n_chars: int) -> int:
        """Smallest k such that ``decode(tokens[:k])`` covers the first ``n_chars`` characters (binary search)."""
        lo, hi = 0, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(tokens[:mid], skip_special_tokens=True)) >= n_chars:
                hi = mid
            else:
                lo = mid + 1
        return lo


def grounding_reason_histogram(episodes: Sequence[Episode]) -> dict[str, int]:
    """Counts of each grounding reason code (``ok`` included) over a batch of episodes."""
    hist: dict[str, int] = {}
    for ep in episodes:
        reason: GroundingResult = ep.grounding
        hist[reason.reason] = hist.get(reason.reason, 0) + 1
    return hist
