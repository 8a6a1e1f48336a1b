"""Typed MGPO configuration: `load_config` merges a YAML preset, its `base:` chain and dotted overrides into a
validated `MGPOConfig`, or raises `ConfigError` naming each bad field, the value it got and how to fix it.

The field names are a contract the rest of the pipeline codes against; every field carries its own docstring
(pydantic turns it into the description that `describe_config` prints). `config_hash` is a cache key and an
MLflow tag, so it covers exactly the fields that can change results.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import string
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "tiny-base-cpu"
HASH_EXCLUDED_FIELDS: tuple[str, ...] = ("tracking", "run_name", "state_dir", "preset")
"""Top-level fields left out of `config_hash`: they name or locate a run but never change what it computes."""
HASH_EXCLUDED_SUBFIELDS: dict[str, tuple[str, ...]] = {
    "deepspeed": ("ssh_port", "master_addr", "master_port", "env_forward"),
}
"""Fields of a section left out of `config_hash`: how the ranks reach each other, never what they compute."""

Resample = Literal["nearest", "bilinear", "bicubic", "lanczos"]
PositiveInt = typing.Annotated[int, Field(ge=1)]
UnitFloat = typing.Annotated[float, Field(ge=0.0, lt=1.0)]


class ConfigError(ValueError):
    """An unusable config. `problems` holds one `<dotted.path>: <what> (got <value>); <fix>` line per problem."""

    def __init__(self, problems: Sequence[str], context: str = "") -> None:
        self.problems = list(problems)
        where = f" ({context})" if context else ""
        head = f"invalid MGPO config{where}: {len(self.problems)} problem(s)"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


class _FieldProblem(ValueError):
    """Raised by our validators so the error wrapper can print path, value and fix instead of pydantic's prose."""

    def __init__(self, what: str, got: Any, fix: str, field: str | None = None) -> None:
        super().__init__(what)
        self.what, self.got, self.fix, self.field = what, got, fix, field


def _short(value: Any, limit: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line(path: str, what: str, got: Any, fix: str) -> str:
    return f"{path or '<config>'}: {what} (got {_short(got)}); {fix}"


class _Section(BaseModel):
    """Shared behaviour: unknown keys refused, assignments validated (and reverted when rejected)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
            return
        prefix = _SECTION_PATHS.get(type(self), "")
        if name not in type(self).model_fields:
            raise ConfigError([_unknown_field_line(type(self), prefix, name, value)])
        old = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            # pydantic keeps the new value when an after-validator rejects it; never leave an invalid config.
            self.__dict__[name] = old
            raise ConfigError(_problems_from(exc, prefix)) from None


class ModelConfig(_Section):
    """The policy model (also the frozen reference model for the KL term)."""

    path: str | None = None
    """Local Hugging Face model directory; None builds (or reuses) the offline tiny Qwen2.5-VL."""
    tiny_seed: int = Field(0, ge=0)
    """Seed of the offline tiny model (its random init, or the base model's pre-training); ignored when `path`
    is set."""
    tiny: Literal["random", "base"] = "random"
    """Which offline tiny model `path: null` means: `random` (random init; fast tests of the machinery) or
    `base` (pre-trained on synthetic grounding and reading tasks, so MGPO can show learning; shipped with the
    project for seed 0, built and cached under `<state_dir>/models` otherwise)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype the model is loaded in (and the rollout engine runs in)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (METHOD.md §2 uses it)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory (off: Qwen2.5-VL is built into transformers)."""


class DataFilterConfig(_Section):
    """The filter stage's checks (`mgpo data filter`): each switch drops rows with a reason code, and every input
    row ends up kept or dropped (in = kept + dropped)."""

    integrity: bool = True
    """Check every image: its header first (size, decompression-bomb limit), then, with `integrity_decode`, a
    full decode (truncated or corrupt pixel data). Unreadable, empty, missing and bomb files are dropped."""
    integrity_decode: bool = True
    """With `integrity`, also decode every image fully; False keeps the header-only check (much faster, but a
    file truncated after its header passes)."""
    min_side: PositiveInt | None = 28
    """Drop images whose shorter side is below this many pixels (after EXIF rotation); None disables."""
    max_side: PositiveInt | None = None
    """Drop images whose longer side exceeds this many pixels; None disables."""
    max_pixels: PositiveInt | None = None
    """Drop images with more pixels than this (a data choice; the bomb limit is `data.max_image_pixels`);
    None disables."""
    max_aspect: float | None = Field(200.0, gt=1.0)
    """Drop images whose long/short side ratio exceeds this (Qwen's resize refuses ratios above 200); None
    disables."""
    answer_validity: bool = True
    """Drop rows with fewer than two choices or with blank or repeated choice texts. A row whose answer is not
    the letter of one of its choices is dropped even when this is off: the sample schema cannot hold it."""
    dedupe: bool = True
    """Drop rows that repeat an earlier row (same image content by sha256, same question); the first is kept."""
    dedupe_key: Literal["image+question", "image+question+choices"] = "image+question"
    """What makes two rows duplicates; "image+question+choices" keeps HR-Bench's option cycles (same question,
    choices in another order) apart."""
    path_containment: bool = True
    """Drop rows whose image path resolves (symlinks followed) outside the data root (`data.root`, else the
    input's own folder) and the image cache."""
    max_text_chars: PositiveInt = 4096
    """Drop rows whose question or any choice is longer than this many characters."""
    max_row_bytes: PositiveInt = 256 * 1024 * 1024
    """Drop JSONL/TSV rows longer than this many bytes (read in bounded pieces, never whole); HR-Bench rows
    carry a base64 image, so keep it well above the largest image."""
    pass_rate: bool = False
    """Run `pass_rate_n` rollouts of the base model per prompt and drop prompts whose pass rate lies outside
    [`pass_rate_min`, `pass_rate_max`]: all-right and all-wrong prompts give zero GRPO advantage."""
    pass_rate_n: PositiveInt = 8
    """Rollouts per prompt of the pass-rate filter."""
    pass_rate_min: float = Field(0.1, ge=0.0, le=1.0)
    """Lowest pass rate kept (inclusive); the default drops exactly the all-wrong prompts for n <= 10."""
    pass_rate_max: float = Field(0.9, ge=0.0, le=1.0)
    """Highest pass rate kept (inclusive); the default drops exactly the all-right prompts for n <= 10."""
    pass_rate_batch: PositiveInt = 8
    """Prompts per rollout call of the pass-rate filter."""
    workers: PositiveInt = 2
    """Threads that check images in parallel (decoding and hashing release the GIL)."""

    @model_validator(mode="after")
    def _pass_rate_range(self) -> DataFilterConfig:
        if self.pass_rate_min > self.pass_rate_max:
            raise _FieldProblem(f"is above pass_rate_max={self.pass_rate_max}", self.pass_rate_min,
                                "set pass_rate_min <= pass_rate_max", "pass_rate_min")
        n = self.pass_rate_n
        if self.pass_rate and not any(self.pass_rate_min <= k / n <= self.pass_rate_max for k in range(n + 1)):
            raise _FieldProblem(f"keeps no pass rate k/{n} that {n} rollouts can give", self.pass_rate_min,
                                "widen [pass_rate_min, pass_rate_max] or raise pass_rate_n", "pass_rate_min")
        return self


class DataConfig(_Section):
    """Training and evaluation data; without paths a synthetic V*-style dataset is generated locally."""

    train_path: str | None = None
    """Training manifest (JSONL) written by the filter stage; None uses the synthetic training set."""
    eval_path: str | None = None
    """Evaluation manifest; None uses the synthetic evaluation set."""
    root: str | None = None
    """Data root: every image path must resolve inside it (paths escaping it are dropped with a reason)."""
    image_root: str | None = None
    """Folder that relative image paths of the raw inputs start from (default: each input file's own folder).
    MME-RealWorld publishes its images apart from its JSON: `--set data.image_root=/data/mme-realworld/images`."""
    synthetic_train: int = Field(64, ge=0)
    """Number of synthetic training samples generated when `train_path` is None."""
    synthetic_eval: int = Field(32, ge=0)
    """Number of synthetic evaluation samples generated when `eval_path` is None."""
    synthetic_width: int = Field(1536, ge=28)
    """Width in pixels of each synthetic high-resolution image."""
    synthetic_height: int = Field(1024, ge=28)
    """Height in pixels of each synthetic high-resolution image."""
    synthetic_kinds: list[Literal["colour", "shape", "text"]] = Field(
        default_factory=lambda: ["colour", "shape", "text"], min_length=1
    )
    """What the synthetic questions ask about the tag: its colour mark, its shape, or its letter/digit."""
    synthetic_tag_px: int = Field(16, ge=8)
    """Smallest side in original pixels of the synthetic target tag (the tiny base model needs ~80 to find it)."""
    synthetic_mark_fraction: float = Field(0.6, ge=0.05, le=0.9)
    """Share of the tag's side its content fills: a large tag with a small mark is findable in the overview but
    needs a close-up to read."""
    synthetic_decoys: int | None = Field(None, ge=0)
    """Grey decoy tags per image; None = 3 per megapixel (at least 2)."""
    synthetic_choices: int = Field(4, ge=2, le=6)
    """Options per synthetic question (at most the attribute's vocabulary: 6 colours, 6 shapes)."""
    synthetic_shuffle_choices: bool = True
    """Shuffle the options (as benchmarks do); off lists them in the vocabulary's order, so with every value
    offered a value always has the same letter and reading the close-up is all a question asks (the tiny
    base's setting: a 4-layer model does not learn the look-up of a shuffled letter, docs/REPRODUCTION.md)."""
    max_image_pixels: PositiveInt = 100_000_000
    """Decompression-bomb limit (pixels) when opening images; must let 80-megapixel originals through."""
    shuffle_seed: int = 0
    """Seed of the training-data order (and of the option shuffling where a benchmark needs it)."""
    image_cache_dir: str | None = None
    """Where images embedded in data files (HR-Bench base64, parquet bytes) are written, one file per content
    hash; None = `<state_dir>/data/image-cache`."""
    filters: DataFilterConfig = Field(default_factory=DataFilterConfig)
    """Checks of the filter stage."""


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


def _check_template(text: str, placeholders: frozenset[str]) -> str:
    """Checks a `str.format` template uses exactly `placeholders`; returns it unchanged."""
    allowed = ", ".join("{" + p + "}" for p in sorted(placeholders))
    literal_hint = "write literal braces doubled, e.g. \\boxed{{}}"
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise _FieldProblem(f"malformed braces ({exc})", text, literal_hint) from None
    unknown = sorted(used - placeholders)
    if unknown:
        shown = ", ".join("{" + u + "}" for u in unknown)
        raise _FieldProblem(f"unknown placeholder(s) {shown}", text, f"use only {allowed}; {literal_hint}")
    missing = sorted(placeholders - used)
    if missing:
        shown = ", ".join("{" + m + "}" for m in missing)
        raise _FieldProblem(f"missing placeholder(s) {shown}", text, f"include {allowed} in the template")
    return text


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


class AlgorithmConfig(_Section):
    """GRPO advantages and the clipped, KL-regularised policy loss with the multi-turn mask (METHOD.md §2)."""

    advantage: Literal["grpo"] = "grpo"
    """Advantage estimator: group-normalised reward, one scalar per trajectory."""
    adv_eps: float = Field(1e-6, gt=0.0)
    """Added to the group's unbiased std before dividing."""
    clip_low: UnitFloat = 0.2
    """PPO ratio clip below 1 (ratio >= 1 - clip_low)."""
    clip_high: float = Field(0.2, gt=0.0)
    """PPO ratio clip above 1 (ratio <= 1 + clip_high)."""
    kl_coef: float = Field(0.01, ge=0.0)
    """Weight of the KL loss term against the frozen initial model; 0 disables the reference model."""
    kl_estimator: Literal["k1", "k2", "low_var_kl"] = "low_var_kl"
    """Per-token KL estimator; low_var_kl is k3, exp(ref - logp) - (ref - logp) - 1."""
    kl_clamp: float = Field(10.0, gt=0.0)
    """The per-token KL estimate is clamped to [-kl_clamp, kl_clamp]."""
    entropy_coef: float = Field(0.001, ge=0.0)
    """Weight of the entropy bonus."""
    loss_turns: Literal["all", "final"] = "all"
    """Which assistant turns enter the loss: `all` (MGPO's multi-turn mask: both turns' generated tokens) or
    `final` (ablation: only the answer turn; turn 1's box is context, never trained)."""
    train_forced_tokens: bool = False
    """Train on tokens the environment forced into an assistant turn (turn 1's `<|im_end|>` appended after the cut
    JSON block or at the length cap). False: they stay in the context but enter no loss term (they were never
    sampled, so they have no behaviour log-prob); True: trained like sampled tokens, as the reference does."""
    shared_prompt: bool = True
    """Run the prompt the n rollouts of a prompt share (system prompt, overview image, turn-1 question) once per
    micro-batch instead of n times (`mgpo_core.packing`): same log-probs and gradients, less work. Keep a prompt's
    rollouts in one micro-batch (`micro_batch_size` a multiple of `rollout.n`) to share it n ways. Needs a registered
    attention implementation (`model.attn_implementation` sdpa or flash_attention_2, not eager)."""
    ppo_epochs: PositiveInt = 1
    """Passes over each RL step's trajectories."""
    prompts_per_step: PositiveInt = 512
    """Prompts per RL step (each rolled out `rollout.n` times)."""
    mini_batch_prompts: PositiveInt = 128
    """Prompts per optimiser step; must divide `prompts_per_step`."""
    micro_batch_size: PositiveInt = 8
    """Trajectories per forward/backward pass (gradient accumulation inside a mini-batch)."""
    total_steps: PositiveInt = 80
    """RL steps in a training run."""
    seed: int = 0
    """Seed of sampling, init and everything else random in training."""
    reward: str = "answer"
    """Reward function by name (`mgpo_core.training.rewards`): `answer` is the paper's binary answer reward."""

    @model_validator(mode="after")
    def _mini_batch_divides_step(self) -> AlgorithmConfig:
        total, mini = self.prompts_per_step, self.mini_batch_prompts
        if total % mini:
            divisors = [d for d in range(1, total + 1) if total % d == 0]
            nearest = sorted(sorted(divisors, key=lambda d: abs(d - mini))[:6])
            raise _FieldProblem(
                f"must divide algorithm.prompts_per_step={total} so each RL step is whole optimiser steps",
                mini, f"use one of {nearest} or change algorithm.prompts_per_step", field="mini_batch_prompts",
            )
        return self


class OptimizerConfig(_Section):
    """The optimiser and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimiser handed to DeepSpeed: torch AdamW, or plain SGD (no momentum; for checks that read the gradient
    off the update)."""
    lr: float = Field(1e-6, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = Field(0.01, ge=0.0)
    """Decoupled weight decay."""
    betas: tuple[UnitFloat, UnitFloat] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Max global gradient norm; 0 disables clipping."""
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Optimiser steps of linear warm-up from 0."""


class DeepSpeedConfig(_Section):
    """DeepSpeed engine and the process launcher."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 2 shards optimiser states and gradients, 3 also shards parameters."""
    bf16: bool = False
    """Train in bf16 with fp32 master weights in the optimiser."""
    offload_optimizer: bool = False
    """Keep optimiser states in CPU memory (ZeRO stage >= 1)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO stage 3 only)."""
    config_file: str | None = None
    """DeepSpeed JSON (e.g. under infra/) to start from; the fields above override its entries."""
    launcher: Literal["deepspeed", "torchrun", "python"] = "python"
    """How the training process group is started; "python" runs one process."""
    num_gpus: PositiveInt = 1
    """Processes (GPUs) per node."""
    hostfile: str | None = None
    """DeepSpeed hostfile for multi-node runs (launcher "deepspeed" only): one `<ssh host> slots=<processes>`
    line per node, the first is rank 0's; the ranks are started over SSH (pdsh), see docs/SCALE_OUT.md."""
    ssh_port: typing.Annotated[int, Field(ge=1, le=65535)] | None = None
    """SSH port of the hostfile's hosts (DeepSpeed's `--ssh_port`); null: ssh's own default or ssh config."""
    master_addr: str | None = None
    """Address every rank reaches rank 0 at (DeepSpeed's `--master_addr`); null: DeepSpeed's choice (127.0.0.1
    on one node; with a hostfile the first address `hostname -I` prints on the first host)."""
    master_port: typing.Annotated[int, Field(ge=1, le=65535)] | None = None
    """TCP port of the rendezvous on rank 0's host (DeepSpeed's `--master_port`); null: DeepSpeed's 29500."""
    env_forward: list[str] = []
    """More environment variables (names) whose values on the launching node the ranks on every host get, beside
    the built-in set (DS_ACCELERATOR, offline Hugging Face, thread counts, the virtualenv's PATH, MGPO_*, ...)."""
    stall_timeout_s: typing.Annotated[float, Field(gt=0.0)] | None = 1800.0
    """The train task ends the process group and fails (naming the phase) when no RL step finishes for this long
    after the first one (a hung collective, a stuck rollout); null disables the watch."""
    startup_timeout_s: typing.Annotated[float, Field(gt=0.0)] | None = 3600.0
    """The same watch before the first step (model loading, JIT builds, engine start-up); null disables it."""

    @model_validator(mode="after")
    def _consistent_launch(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise _FieldProblem("needs ZeRO stage 3", self.offload_params,
                                "set deepspeed.zero_stage=3 or deepspeed.offload_params=false", "offload_params")
        if self.offload_optimizer and self.zero_stage == 0:
            raise _FieldProblem("needs ZeRO stage >= 1", self.offload_optimizer,
                                "set deepspeed.zero_stage to 1, 2 or 3", "offload_optimizer")
        if self.launcher == "python" and self.num_gpus > 1:
            raise _FieldProblem("launcher 'python' starts a single process", self.num_gpus,
                                "set deepspeed.launcher=deepspeed (or torchrun), or deepspeed.num_gpus=1",
                                "num_gpus")
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise _FieldProblem(f"is only read by the deepspeed launcher, not {self.launcher!r}", self.hostfile,
                                "set deepspeed.launcher=deepspeed or deepspeed.hostfile=null", "hostfile")
        for name in ("master_addr", "master_port"):
            if getattr(self, name) is not None and self.launcher != "deepspeed":
                raise _FieldProblem(f"is only read by the deepspeed launcher, not {self.launcher!r}",
                                    getattr(self, name), f"set deepspeed.launcher=deepspeed or deepspeed.{name}=null",
                                    name)
        if self.ssh_port is not None and self.hostfile is None:
            raise _FieldProblem("is only used to reach the hosts of a hostfile", self.ssh_port,
                                "set deepspeed.hostfile (and deepspeed.launcher=deepspeed) or deepspeed.ssh_port=null",
                                "ssh_port")
        if self.env_forward and self.hostfile is None:
            raise _FieldProblem("is only used for the ranks of a hostfile's hosts", self.env_forward,
                                "set deepspeed.hostfile (and deepspeed.launcher=deepspeed) or deepspeed.env_forward=[]",
                                "env_forward")
        bad = [n for n in self.env_forward if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise _FieldProblem("holds names that are not environment variable names", bad,
                                "list variable names only, e.g. [NCCL_SOCKET_IFNAME]", "env_forward")
        return self


class CheckpointConfig(_Section):
    """Atomic training checkpoints for exact resume."""

    every_steps: PositiveInt = 10
    """Write a checkpoint every this many RL steps (and after the last one)."""
    keep_last: PositiveInt = 2
    """Checkpoints kept on disk; older ones are deleted."""
    export_hf: bool = True
    """Also export the final policy as a Hugging Face directory (what gets registered in MLflow)."""
    select_every: int = Field(0, ge=0)
    """Checkpoint selection: keep every k-th checkpoint, and after training evaluate each (and the last) on the
    configured benchmarks (greedy, `evaluation.limit`), log `select/<promotion metric>` per step to the training
    run, and register the best one (its step is in the lineage tags). 0 = off: the last checkpoint is registered."""


class TrackingConfig(_Section):
    """MLflow tracking; none of these change results, so they are outside `config_hash`."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; None means a local SQLite store under `state_dir`."""
    experiment_name: str = "mgpo"
    """MLflow experiment the runs go to."""
    registered_model_name: str = "mgpo-policy"
    """MLflow registered model the trained checkpoints become versions of."""
    run_id: str | None = None
    """Existing MLflow run to log into (set by the pipeline for the launched trainer)."""
    log_every_steps: PositiveInt = 1
    """Log training metrics every this many RL steps."""
    log_episodes_every: int = Field(0, ge=0)
    """Every this many RL steps, log `log_episodes` sampled episodes (a table and a picture with the boxes) to
    the run and to `<run_dir>/episodes/`; 0 = off."""
    log_episodes: PositiveInt = 8
    """Episodes per sampled-episode log (spread over the step's prompts)."""


class EvaluationConfig(_Section):
    """Benchmarks run after training and the rule that promotes a model to champion."""

    benchmarks: list[str] = Field(default_factory=lambda: ["synthetic"], min_length=1)
    """Benchmark names from the benchmark registry, evaluated in this order."""
    data_paths: dict[str, str] = Field(default_factory=dict)
    """Data file or folder per benchmark name, e.g. {vstar: /data/vstar_bench, hrbench_8k:
    /data/hr_bench_8k.tsv}; a benchmark missing here reads `data.eval_path` (the synthetic one generates its
    set when both are unset). `mgpo eval --data` overrides it for a single benchmark."""
    image_roots: dict[str, str] = Field(default_factory=dict)
    """Folder that a benchmark's relative image paths start from, per benchmark name (default: the data
    file's folder), e.g. {mme_realworld_lite: /data/mme-realworld-lite/images}; `mgpo eval --image-root`."""
    mode: Literal["mgpo", "direct"] = "mgpo"
    """"mgpo" runs the two-turn grounding episode; "direct" asks for the answer in one turn."""
    limit: PositiveInt | None = None
    """Evaluate at most this many questions per benchmark; None means all."""
    promotion_metric: str = "eval/synthetic/overall"
    """Metric (`eval/<benchmark>/<name>`) compared against the champion's to decide promotion."""
    min_improvement: float = 0.0
    """The challenger must beat the champion's promotion metric by more than this."""
    max_new_tokens: PositiveInt = 1024
    """Cap on generated tokens per assistant turn at evaluation (greedy decoding)."""
    batch_size: PositiveInt = 8
    """Questions per evaluation batch (one batched generation call per turn; the progress bar counts batches).
    Lower it for direct mode at full resolution, where each image can carry thousands of visual tokens."""
    subsample_seed: int = 0
    """Seed of the deterministic `limit` subsample (a hash of seed and sample id orders the questions)."""
    direct_system_prompt: str = "You are a helpful assistant."
    """System prompt of the direct single-turn baseline (no grounding step), used verbatim."""
    direct_template: str = (
        "{question}\n{choices}\nAnswer with the letter of the correct choice inside \\boxed{{}}."
    )
    """User turn of the direct baseline after the image; `str.format` with {question} and {choices} (the
    choices header plus one "(A) ..." line per option). Write literal braces as {{ and }}."""
    direct_max_pixels: PositiveInt | None = None
    """Pixel budget of the image in direct mode; None = the model's own maximum (the image processor's
    max_pixels, 12,845,056 = 16,384 visual tokens for Qwen2.5-VL): the full-resolution baseline. The paper's
    direct numbers use 1280*28*28 = 1,003,520, the same budget as the MGPO overview."""
    picture_samples: int = Field(16, ge=0)
    """Questions drawn (with predicted crop and ground-truth boxes) in the evaluation picture; 0 = no picture."""
    during_training_every: int = Field(0, ge=0)
    """Validate every this many RL steps during training (and once before the first step): greedy rollouts, in
    the training mode, on the first `during_training_limit` questions of the evaluation split; logged as `val/*`
    (accuracy, valid-box ratio, box-contains-target, IoU). 0 = off."""
    during_training_limit: PositiveInt = 32
    """Questions per validation during training (the evaluation split: `data.eval_path` or the synthetic one)."""

    @field_validator("direct_template")
    @classmethod
    def _direct_placeholders(cls, text: str) -> str:
        return _check_template(text, frozenset({"question", "choices"}))

    @field_validator("benchmarks")
    @classmethod
    def _no_duplicate_benchmarks(cls, names: list[str]) -> list[str]:
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise _FieldProblem(f"lists {dupes} more than once", names, "name each benchmark once")
        return names

    @model_validator(mode="after")
    def _promotion_metric_is_evaluated(self) -> EvaluationConfig:
        parts = self.promotion_metric.split("/")
        if len(parts) >= 3 and parts[0] == "eval" and parts[1] not in self.benchmarks:
            raise _FieldProblem(
                f"names benchmark {parts[1]!r}, which evaluation.benchmarks={self.benchmarks} does not run",
                self.promotion_metric,
                f"add {parts[1]!r} to evaluation.benchmarks or pick eval/<one of them>/overall",
                "promotion_metric",
            )
        return self


class MGPOConfig(_Section):
    """The whole run: one section per concern plus the names that locate the run."""

    preset: str | None = None
    """Preset name or YAML path the config was loaded from (informational)."""
    run_name: str = "mgpo"
    """Human-readable run name (MLflow run name, run-directory prefix)."""
    state_dir: str = ".mgpo"
    """Local state folder: run directories, checkpoints, the MLflow store, Prefect results."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Policy model."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training and evaluation data."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Rollout generation."""
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    """Box parsing and validation."""
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """RL algorithm."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Optimiser."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed and launcher."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """Evaluation and promotion."""

    @model_validator(mode="after")
    def _sections_agree(self) -> MGPOConfig:
        if self.deepspeed.bf16 and self.model.dtype == "float16":
            raise _FieldProblem("bf16 training cannot run a float16 model", self.model.dtype,
                                "set model.dtype=bfloat16 (or float32), or deepspeed.bf16=false", "model.dtype")
        if self.algorithm.shared_prompt and self.model.attn_implementation == "eager":
            raise _FieldProblem("algorithm.shared_prompt runs through transformers' registered attention "
                                "functions, which 'eager' is not", self.model.attn_implementation,
                                "set model.attn_implementation=sdpa, or algorithm.shared_prompt=false",
                                "model.attn_implementation")
        return self


_SECTION_PATHS: dict[type[BaseModel], str] = {
    field.annotation: name
    for name, field in MGPOConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}
_SECTION_PATHS[DataFilterConfig] = "data.filters"


# ---------------------------------------------------------------- error wrapping


def _section_class(parts: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class reached by walking `parts` from the root, or None if they leave the section tree."""
    cls: type[BaseModel] = MGPOConfig
    for part in parts:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def _leaf_field(parts: Sequence[str | int]) -> Any:
    """The FieldInfo of the deepest named field on `parts` (list/tuple indices stop the walk)."""
    cls: type[BaseModel] | None = MGPOConfig
    found = None
    for part in parts:
        if cls is None or str(part) not in cls.model_fields:
            break
        found = cls.model_fields[str(part)]
        ann = found.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return found


def _unknown_field_line(cls: type[BaseModel], prefix: str, name: str, value: Any) -> str:
    names = list(cls.model_fields)
    path = f"{prefix}.{name}" if prefix else name
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""
    where = f"'{prefix}'" if prefix else "the top level"
    return _line(path, f"unknown field in {where}", value, f"{hint}valid fields: {', '.join(names)}")


def _fix_hint(field: Any) -> str:
    if field is None:
        return "see describe_config() for the valid fields"
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"give a mapping of {', '.join(ann.model_fields)}"
    if typing.get_origin(ann) is Literal:
        return f"use one of {', '.join(repr(a) for a in typing.get_args(ann))}"
    default = field.default_factory() if field.default_factory else field.default
    return f"expected {_type_name(ann)}, e.g. the default {default!r}"


def _problems_from(exc: ValidationError, prefix: str = "") -> list[str]:
    """One `path: what (got value); fix` line per pydantic error; `prefix` is the section path of `exc`."""
    lines = []
    for err in exc.errors():
        parts: list[str | int] = [*(prefix.split(".") if prefix else []), *err["loc"]]
        path = ".".join(str(p) for p in parts)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldProblem):
            full = path if cause.field is None else ".".join(filter(None, [path, cause.field]))
            lines.append(_line(full, cause.what, cause.got, cause.fix))
        elif err["type"] == "extra_forbidden":
            parent = _section_class(parts[:-1]) or MGPOConfig
            owner = ".".join(str(p) for p in parts[:-1])
            lines.append(_unknown_field_line(parent, owner, str(parts[-1]), err["input"]))
        else:
            what = err["msg"].removeprefix("Value error, ")
            lines.append(_line(path, what[:1].lower() + what[1:], err["input"], _fix_hint(_leaf_field(parts))))
    return lines


def _type_name(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


# ---------------------------------------------------------------- loading


def available_presets() -> list[str]:
    """Names of the packaged presets (YAML files in `mgpo_core/presets/`), sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_from_dict(data: Mapping[str, Any], context: str = "") -> MGPOConfig:
    """Validates a plain nested mapping (e.g. a parsed YAML) into an `MGPOConfig`, raising `ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError([_line("", "a config must be a mapping of sections", data, "see describe_config()")],
                          context)
    try:
        return MGPOConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc), context) from None


def load_config(preset_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> MGPOConfig:
    """Loads a packaged preset by name (None = DEFAULT_PRESET, "tiny-base-cpu") or a YAML file by path, then applies overrides.

    A YAML may start from another with `base: <preset name or path relative to it>`; mappings merge key by key,
    lists and scalars replace. Overrides are `dotted.key=value` with the value parsed as YAML
    (`algorithm.kl_coef=0.02`, `evaluation.benchmarks=[vstar,synthetic]`, `model.path=null`). After merging,
    string values expand `${VAR}` from the environment (`${VAR:-default}` gives a fallback, `$${` a literal
    `${`); an unset variable without fallback is an error naming the field.
    """
    if isinstance(overrides, str):
        raise ConfigError([_line("overrides", "must be a list of key=value strings", overrides,
                                 f"pass [{overrides!r}]")])
    ref = DEFAULT_PRESET if preset_or_path is None else preset_or_path
    file, label = _resolve_source(ref, None)
    context = f"from {label}" + (f" with overrides {list(overrides)}" if overrides else "")
    tree = _load_tree(file, frozenset())
    problems: list[str] = []
    for text in overrides:
        problems.extend(_apply_override(tree, text))
    if problems:
        raise ConfigError(problems, context)
    tree = _expand_env(tree, "", problems)
    if problems:
        raise ConfigError(problems, context)
    tree.setdefault("preset", label)
    return config_from_dict(tree, context)


def _resolve_source(ref: str | Path, relative_to: Path | None, field: str = "preset") -> tuple[Path, str]:
    """(file, label) for a packaged preset name or a YAML path (relative paths first against `relative_to`)."""
    names = available_presets()
    if isinstance(ref, str) and ref in names:
        return PRESETS_DIR / f"{ref}.yaml", ref
    path = Path(ref).expanduser()
    if relative_to is not None and not path.is_absolute() and (relative_to / path).is_file():
        path = relative_to / path
    if path.is_file():
        return path, str(ref)
    close = difflib.get_close_matches(str(ref), names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError([_line(field, "no packaged preset or YAML file by that name", str(ref),
                             f"{hint}use one of {names} or the path of a .yaml file")])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([_line(str(path), "cannot read the file", exc.strerror, "check the path")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([_line(str(path), f"is not valid YAML: {exc}".replace("\n", " "), path.name,
                                 "fix the YAML syntax at the position shown")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([_line(str(path), "top level must be a mapping of sections", data,
                                 "write `section:` keys such as `algorithm:` at the top level")])
    return data


def _load_tree(file: Path, seen: frozenset[Path]) -> dict[str, Any]:
    key = file.resolve()
    if key in seen:
        raise ConfigError([_line("base", "inheritance cycle", str(file), "remove one of the `base:` links")])
    data = _read_yaml(file)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError([_line(f"{file}: base", "must be a preset name or a YAML path", base,
                                 f"use one of {available_presets()} or a path")])
    parent_file, _ = _resolve_source(base, file.parent, field=f"base (in {file})")
    return _merge(_load_tree(parent_file, seen | {key}), data)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(tree: dict[str, Any], text: str) -> list[str]:
    """Applies one `dotted.key=value` override to `tree` in place; returns the problems instead of raising."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        return [_line(key or "<override>", "override has no 'dotted.key=' part", text,
                      "write it as dotted.key=value, e.g. algorithm.kl_coef=0.02")]
    parts = key.split(".")
    for depth in range(len(parts)):
        cls = _section_class(parts[:depth])
        if cls is None:
            return [_line(".".join(parts[:depth]), "is a value, not a section", text,
                          f"override '{'.'.join(parts[:depth])}=...' itself")]
        if parts[depth] not in cls.model_fields:
            return [_unknown_field_line(cls, ".".join(parts[:depth]), parts[depth], raw)
                    + f" (in override {text!r})"]
    text_only = _text_only(_leaf_field(parts).annotation)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if not text_only:
            first = str(exc).splitlines()[0]
            return [_line(key, f"override value is not valid YAML ({first})", raw, f"quote it: {key}='...'")]
        value = raw.strip()
    # YAML reads `run_name=123` as an int and `turn1_template={question}` as a mapping; a text field means text.
    if text_only and value is not None and not isinstance(value, str):
        value = raw.strip()
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]] = _merge(node[parts[-1]], value)
    else:
        node[parts[-1]] = value
    return []


def _text_only(ann: Any) -> bool:
    args = typing.get_args(ann) if typing.get_origin(ann) in (types.UnionType, typing.Union) else (ann,)
    return str in args and not {bool, int, float} & set(args)


_ENV_PATTERN = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, path: str, problems: list[str]) -> Any:
    """Returns `node` with `${VAR}` expanded in every string; unset variables are appended to `problems`."""
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}.{i}", problems) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        escaped, name, default = match.groups()
        if escaped:
            return match.group(0)[1:]
        value = os.environ.get(name)
        if value:  # empty counts as unset, as with the shell's ${VAR:-default}
            return value
        if default is not None:
            return default
        problems.append(_line(path, f"environment variable {name} is not set", node,
                              f"export {name}=<value> or pass the override {path}=<value>"))
        return match.group(0)

    return _ENV_PATTERN.sub(substitute, node)


# ---------------------------------------------------------------- output


def config_hash(cfg: MGPOConfig) -> str:
    """16 hex chars of sha256 over the canonical JSON (sorted keys, no spaces) of the result-relevant fields.

    Excluded (`HASH_EXCLUDED_FIELDS`): `tracking.*` (where metrics go), `run_name`, `state_dir` (where files go)
    and `preset` (where the values came from); and (`HASH_EXCLUDED_SUBFIELDS`) the launcher's connection settings
    `deepspeed.ssh_port`, `master_addr`, `master_port` and `env_forward`. Everything else, including evaluation
    settings and `model.path` after `${VAR}` expansion, is hashed, so the hash is a sound cache key for every stage.
    """
    exclude: dict[str, Any] = {name: True for name in HASH_EXCLUDED_FIELDS}
    exclude.update({section: set(names) for section, names in HASH_EXCLUDED_SUBFIELDS.items()})
    data = cfg.model_dump(mode="json", exclude=exclude)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the prompt templates) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _represent_str)


def _escape_env(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _escape_env(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_env(v) for v in node]
    return node.replace("${", "$${") if isinstance(node, str) else node


def to_yaml(cfg: MGPOConfig) -> str:
    """The full config as YAML that `load_config(path)` reads back to an equal config."""
    body = yaml.dump(_escape_env(cfg.model_dump(mode="json")), Dumper=_BlockDumper, sort_keys=False,
                     allow_unicode=True, width=100)
    return f"# MGPO config, config_hash {config_hash(cfg)}\n{body}"


def save_config(cfg: MGPOConfig, path: str | Path) -> Path:
    """Writes `to_yaml(cfg)` atomically (temp file + rename) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(to_yaml(cfg), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def flatten_config(cfg: MGPOConfig) -> dict[str, str]:
    """`{"algorithm.kl_coef": "0.01", ...}`: every leaf as a string (JSON for non-strings), for MLflow params."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:  # an empty mapping field (evaluation.data_paths) is itself a leaf
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk(cfg.model_dump(mode="json"), "")
    return flat


def describe_config() -> str:
    """Markdown reference of every field: dotted name, type, default and its docstring."""
    lines = ["# MGPO configuration reference", ""]

    def section(cls: type[BaseModel], prefix: str) -> None:
        nested = []
        for name, field in cls.model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((ann, path))
                continue
            default = field.default_factory() if field.default_factory else field.default
            doc = " ".join((field.description or "").split())
            lines.append(f"- `{path}` ({_type_name(ann)}, default `{default!r}`): {doc}")
        for sub, path in nested:
            lines.extend(["", f"## `{path}`: {' '.join((sub.__doc__ or '').split())}", ""])
            section(sub, path)

    section(MGPOConfig, "")
    return "\n".join(lines) + "\n"
