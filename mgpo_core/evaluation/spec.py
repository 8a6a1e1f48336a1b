"""The benchmark registry: a benchmark is a small `BenchmarkSpec` of pure functions (read, prompt convention,
answer extraction, labels, aggregation) registered once by name; duplicates are refused.

Adding a benchmark = writing one spec (see `benchmarks.py`) and calling `register_benchmark(spec)`; lookups
(`get_benchmark`, `available_benchmarks`) live in `benchmarks.py`, above the built-ins they must see. The runner
is generic: it reads the samples, applies the prompt convention, rolls out, extracts, labels and aggregates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgpo_core.data.schema import LETTERS, Sample
from mgpo_core.evaluation.extract import Extraction, extract_answer
from mgpo_core.evaluation.scoring import Outcome

if TYPE_CHECKING:
    from mgpo_core.config import MGPOConfig

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "ReadContext",
    "plain_question",
    "register_benchmark",
    "sample_attr",
    "strip_inline_choices",
]


def plain_question(sample: Sample) -> Sample:
    """The question as the reader produced it."""
    return sample


@dataclass(frozen=True)
class ReadContext:
    """What a benchmark reader gets: the data ``path`` (None = the benchmark's default, if it has one), a
    ``work_dir`` it may write into (decoded images, generated data), and the run's config."""

    path: Path | None
    work_dir: Path
    cfg: MGPOConfig


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark, as data plus pure functions.

    - ``read(ctx) -> list[Sample]``: canonical samples (answer letter, shuffled options where needed).
    - ``prompt(sample) -> Sample``: the prompt convention, e.g. drop options written into the question text
      (turn 1 must not show the choices; turn 2 lists them from ``Sample.choices``).
    - ``extract(turns, choices) -> Extraction``: the answer letter from the model's assistant turns.
    - ``labels(sample) -> {key: value}``: what ``aggregate`` groups by (category, cycle, task, ...).
    - ``aggregate(outcomes) -> {metric: fraction}``: the benchmark's published scoring.
    - ``has_gt_boxes``: its samples carry ground-truth boxes (grounding IoU/containment are reported).
    - ``needs_data``: reading needs a data path (False: the benchmark can generate its questions).
    - ``data_hint``: how to obtain and pass the data (printed when the path is missing or wrong).
    """

    name: str
    description: str
    read: Callable[[ReadContext], list[Sample]]
    labels: Callable[[Sample], Mapping[str, str]]
    aggregate: Callable[[Sequence[Outcome]], dict[str, float]]
    extract: Callable[[Sequence[str], Sequence[str]], Extraction] = extract_answer
    prompt: Callable[[Sample], Sample] = plain_question
    has_gt_boxes: bool = False
    needs_data: bool = True
    data_hint: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", self.name):
            raise ValueError(
                f"benchmark name {self.name!r} must be lower-case letters, digits and '_' (it becomes the "
                "metric prefix eval/<name>/...); e.g. 'hrbench_8k'"
            )


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add ``spec`` under ``spec.name``; a second spec with the same name is an error (no silent override)."""
    if spec.name in BENCHMARKS:
        raise ValueError(
            f"benchmark {spec.name!r} is already registered ({BENCHMARKS[spec.name].description}); "
            "pick another name or remove the earlier registration"
        )
    BENCHMARKS[spec.name] = spec
    return spec


# -------------------------------------------------------------------------------- prompt conventions


_OPTIONS_HEADER = re.compile(
    r"(?i)\s*(?:the\s+)?(?:choices|options)(?:\s+are)?(?:\s+listed)?(?:\s+below)?\s*:\s*"
)
_INLINE_OPTION = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])\s+(.*\S)\s*$")


def strip_inline_choices(sample: Sample) -> Sample:
    """Drop lines of the question that restate the options ("(A) red", "B. blue") and a trailing header.

    Turn 1 must not show the choices (METHOD.md §1.2) and turn 2 lists them itself, so options written into
    the question text (the V* parquet variant, some MME-RealWorld rows) would leak or appear twice. A line is
    only dropped when its letter and text match the sample's own choice, so questions that merely contain
    "(A)" keep it.
    """
    lines = sample.question.splitlines()
    own = {LETTERS[i]: " ".join(c.split()).lower() for i, c in enumerate(sample.choices)}
    kept: list[str] = []
    dropped = False
    for line in lines:
        m = _INLINE_OPTION.match(line)
        if m is not None:
            letter = m.group(1) or m.group(2)
            if own.get(letter) == " ".join(m.group(3).split()).lower():
                dropped = True
                continue
        kept.append(line)
    if not dropped:
        return sample
    while kept and _OPTIONS_HEADER.fullmatch(kept[-1]):
        kept.pop()  # "The choices are listed below:" left dangling
    question = "\n".join(kept).strip()
    return replace(sample, question=question) if question else sample


def sample_attr(sample: Sample, key: str, default: str = "") -> str:
    """A label stored on the sample: a field (``category``, ``source``) or an entry of ``Sample.meta``."""
    value: Any = getattr(sample, key, None)
    if value in (None, ""):
        meta = getattr(sample, "meta", ())
        pairs = meta.items() if isinstance(meta, Mapping) else meta
        value = next((v for k, v in pairs if k == key and v not in (None, "")), None)
    return default if value in (None, "") else str(value)
