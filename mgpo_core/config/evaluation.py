"""`EvaluationConfig`: the benchmarks run after training and the rule that promotes a model to champion."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mgpo_core.config.base import PositiveInt, _check_template, _Section
from mgpo_core.config.errors import _FieldProblem


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
    during_training_heldout: bool = False
    """Validate also on synthetic questions from the held-out geometry band (aspect ratios and sizes no
    `data.synthetic_geometry: varied` training image has, docs/REPRODUCTION.md), logged as `val_heldout/*`:
    whether the learnt grounding carries over to unseen image geometry. Needs the synthetic evaluation split."""

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
