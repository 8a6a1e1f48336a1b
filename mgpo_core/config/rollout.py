"""`RolloutConfig` (two-turn episode generation) and `GroundingConfig` (how the turn-1 box is checked)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mgpo_core.config.base import PositiveInt, Resample, _check_template, _Section
from mgpo_core.config.errors import _FieldProblem


class RolloutConfig(_Section):
    """Two-turn episode generation: sampling, image sizes, prompt text and the vLLM engine."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    """Rollout engine; "auto" takes vLLM when importable, else Hugging Face `generate`."""
    n: int = Field(8, ge=2)
    """Rollouts per prompt (the GRPO group size); at least 2, or every advantage is zero."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of training rollouts (evaluation decodes greedily)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus-sampling mass of training rollouts."""
    max_new_tokens_turn1: PositiveInt = 8192
    """Cap on the tokens the model generates in turn 1 (grounding)."""
    max_new_tokens_turn2: PositiveInt = 8192
    """Cap on the tokens the model generates in turn 2 (answer)."""
    max_response_tokens: PositiveInt = 12192
    """Cap on the whole multi-turn response (both assistant turns plus the inserted user turn)."""
    min_pixels: int = Field(256 * 28 * 28, ge=28 * 28)
    """Lower pixel bound of the overview and of the enlarged crop (Qwen `smart_resize`)."""
    max_pixels: int = Field(1280 * 28 * 28, ge=28 * 28)
    """Upper pixel bound of the overview and of the enlarged crop (Qwen `smart_resize`)."""
    overview_resample: Resample = "bicubic"
    """Resampling filter used to downscale the original into the overview."""
    crop_resample: Resample = "nearest"
    """Resampling filter used to resize the crop (the reference uses nearest)."""
    system_prompt: str = (
        "You answer questions about high-resolution images in two steps. First, find the part of the image "
        "that matters most for the question and give its bounding box as pixel coordinates [x1, y1, x2, y2] "
        "of the image you are shown, in a ```json code block at the end of your reply, written as "
        '[{"bbox_2d": [x1, y1, x2, y2], "label": "<what it shows>"}], then stop. The system will cut that '
        "area out of the original full-resolution image, enlarge it and show it to you. Second, once you "
        "have seen the enlarged area, give the letter of the correct choice inside \\boxed{}."
    )
    """System prompt, used verbatim (it is not a format string, so braces need no escaping)."""
    turn1_template: str = (
        "{question}\nBefore answering, find the image area most relevant to this question and output its "
        "coordinates in JSON."
    )
    """User turn 1 after the image; `str.format` with {question} only (no choices yet). Write literal braces
    as {{ and }}."""
    turn2_valid_template: str = (
        "Here is the sub-image cut from the original image at your coordinates, enlarged.\n"
        "Question: {question}\n{choices}\n"
        "Analyse both the original image and the enlarged sub-image. If the sub-image does not show what the "
        "question needs, rely on the original image. Put the letter of your final answer inside \\boxed{{}}."
    )
    """User turn 2 when the box was valid (the crop follows as the second image); `str.format` with
    {question} and {choices}, where {choices} is `choices_header` plus one "(A) ..." line per option."""
    turn2_fallback_template: str = (
        "Your coordinates were missing or invalid, so no sub-image could be cut; the original image is shown "
        "again instead.\nQuestion: {question}\n{choices}\n"
        "Analyse both images and answer from the original image where the second one adds nothing. Put the "
        "letter of your final answer inside \\boxed{{}}."
    )
    """User turn 2 when the box was missing or invalid (the resized original is re-sent as the second image);
    same placeholders as `turn2_valid_template`."""
    choices_header: str = "The choices are listed below:"
    """Line that opens the answer options inside {choices}."""
    third_turn: bool = False
    """Inference only: allow a third grounding turn (METHOD.md §1.6); training always uses exactly two."""
    mode: Literal["mgpo", "single_turn"] = "mgpo"
    """Training rollouts: `mgpo` (two turns: box, crop, answer) or `single_turn` (the paper's GRPO baseline: one
    turn on the overview alone, asked for the box and the answer together; nothing is cropped)."""
    single_turn_system_prompt: str = (
        "You answer questions about high-resolution images. Give the bounding box of the image area that "
        "matters most for the question as pixel coordinates in a ```json code block, written as "
        '[{"bbox_2d": [x1, y1, x2, y2], "label": "<what it shows>"}], then the letter of your final answer '
        "inside \\boxed{}."
    )
    """System prompt of `mode: single_turn` (used verbatim)."""
    single_turn_template: str = (
        "{question}\n{choices}\nOutput the coordinates of the key image area in JSON, then put the letter of "
        "your final answer inside \\boxed{{}}."
    )
    """User text of `mode: single_turn` after the image; `str.format` with {question} and {choices}."""
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    """vLLM: share of GPU memory it may take (it is colocated with the trainer)."""
    tensor_parallel_size: PositiveInt = 1
    """vLLM: GPUs one engine instance spans."""
    enforce_eager: bool = True
    """vLLM: skip CUDA-graph / torch.compile capture (faster start, slower decode)."""
    enable_sleep_mode: bool = False
    """vLLM: free weights and KV cache while the trainer updates, wake before the next rollout."""
    max_model_len: PositiveInt | None = None
    """vLLM: context length; None lets vLLM take the model's own."""
    enable_prefix_caching: bool = True
    """vLLM: reuse the KV cache of the shared turn-1 prompt across the n samples and into turn 2."""

    @field_validator("turn1_template")
    @classmethod
    def _turn1_placeholders(cls, text: str) -> str:
        return _check_template(text, frozenset({"question"}))

    @field_validator("turn2_valid_template", "turn2_fallback_template", "single_turn_template")
    @classmethod
    def _turn2_placeholders(cls, text: str) -> str:
        return _check_template(text, frozenset({"question", "choices"}))

    @model_validator(mode="after")
    def _pixel_bounds_ordered(self) -> RolloutConfig:
        if self.min_pixels > self.max_pixels:
            raise _FieldProblem(
                f"is larger than rollout.max_pixels={self.max_pixels}", self.min_pixels,
                "lower rollout.min_pixels or raise rollout.max_pixels", field="min_pixels",
            )
        return self


class GroundingConfig(_Section):
    """How the turn-1 box is parsed and validated (METHOD.md §1.3-1.4); defaults are the strict reference."""

    coord_mode: Literal["absolute", "relative1000"] = "absolute"
    """Box coordinates: absolute pixels of the overview (Qwen2.5-VL) or 0-1000 relative (Qwen3-VL)."""
    accept_float: bool = False
    """Accept non-integer coordinates (rounded); the reference requires 4 integers."""
    accept_unfenced: bool = False
    """Accept a JSON box outside a ```json fence; the reference requires the fence."""
    clamp_tolerance: float = Field(0.0, ge=0.0, le=0.5)
    """Clamp a box that spills outside the image by at most this fraction of the image side; 0 = no clamping."""
    min_side: int = Field(28, ge=1)
    """A valid box has both sides strictly longer than this many overview pixels."""
    max_aspect: float = Field(100.0, gt=1.0)
    """A valid box has aspect ratio (long side / short side) strictly below this."""
    truncate_after_block: bool = True
    """Cut the turn-1 text right after the accepted JSON block and end it with <|im_end|>."""
