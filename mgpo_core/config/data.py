"""`DataConfig` (training and evaluation data) and its `DataFilterConfig` (the filter stage's checks)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mgpo_core.config.base import PositiveInt, _Section
from mgpo_core.config.errors import _FieldProblem


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
    eval_overlap: bool = True
    """Drop rows whose image (same content, sha256) — with any question — belongs to a configured evaluation
    benchmark whose data is given (`evaluation.benchmarks` + `evaluation.data_paths` or `data.eval_path`); reason
    `eval_overlap`, counted per benchmark in the report. Evaluation data must never be trained on."""
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
    allow_synthetic: bool = False
    """With a real model (`model.path` set) and no training inputs, train on the synthetic set anyway. Off, such a
    run refuses to start (a 7B run on the 64-image toy set is a mistake, not a result): give the training data
    with `mgpo run --input <MME-RealWorld JSON>` or set this to true when the synthetic set is what you mean."""
    root: str | None = None
    """Data root: every image path must resolve inside it (paths escaping it are dropped with a reason)."""
    image_root: str | None = None
    """Folder that relative image paths of the raw inputs start from (default: each input file's own folder).
    MME-RealWorld publishes its images apart from its JSON: `--set data.image_root=/data/mme-realworld/images`."""
    validation_rows: int = Field(0, ge=0)
    """Rows of the filtered training data the filter stage holds out as a validation split
    (``<dataset>/validation.jsonl``, chosen by a hash of ``shuffle_seed`` and the row id; never trained on):
    what checkpoint selection scores with ``checkpoint.select_on: [validation]``. 0 = none."""
    synthetic_train: int = Field(64, ge=0)
    """Number of synthetic training samples generated when `train_path` is None."""
    synthetic_eval: int = Field(32, ge=0)
    """Number of synthetic evaluation samples generated when `eval_path` is None."""
    synthetic_width: int = Field(1536, ge=28)
    """Width in pixels of each synthetic high-resolution image."""
    synthetic_height: int = Field(1024, ge=28)
    """Height in pixels of each synthetic high-resolution image."""
    synthetic_geometry: Literal["fixed", "varied", "heldout"] = "fixed"
    """How each synthetic image's size is drawn: `fixed` at `synthetic_width` x `synthetic_height`; `varied`
    draws its aspect ratio (4:3, 3:4, 16:9, 9:16, 1:1, 2:1) and its area (0.6-2x the width x height reference,
    the tag scaled with it), deterministic from the seed; `heldout` draws from a band `varied` never uses
    (3:2, 2:3, 5:4, 4:5 at 2.2-2.8x the area: docs/REPRODUCTION.md) to test a model on unseen geometry."""
    synthetic_kinds: list[Literal["colour", "shape", "text"]] = Field(
        default_factory=lambda: ["colour", "shape", "text"], min_length=1
    )
    """What the synthetic questions ask about the tag: its colour mark, its shape, or its letter/digit."""
    synthetic_tag_px: int = Field(16, ge=8)
    """Smallest side in original pixels of the synthetic target tag (the tiny base model needs ~80 to find it), at
    the reference size (a `varied` image scales it with its side)."""
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
