"""The built-in benchmarks (METHOD.md §3-4): V*, HR-Bench 4K/8K, MME-RealWorld (+ Lite) and the synthetic set,
each one `BenchmarkSpec` registered on import.

File formats are parsed by the dataset readers (`mgpo_core.data.readers.read_rows`); the specs only say which
format, which labels the scoring groups by, and how to score. Labels: V* and HR-Bench use `Sample.category`
(direct_attributes | relative_position; single | cross), HR-Bench's option cycle is `cycle_category` and
MME-RealWorld's `task`/`subtask` are in `Sample.meta`.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mgpo_core.data.schema import Sample
from mgpo_core.data.synthetic import read_samples_jsonl, synthetic_options, write_synthetic_split
from mgpo_core.evaluation.scoring import (
    Outcome,
    accuracy,
    hrbench_scores,
    mme_realworld_scores,
    synthetic_scores,
    vstar_scores,
)
from mgpo_core.evaluation.spec import (
    BENCHMARKS,
    BenchmarkSpec,
    ReadContext,
    register_benchmark,
    sample_attr,
    strip_inline_choices,
)

__all__ = ["BUILTIN_BENCHMARKS", "available_benchmarks", "get_benchmark", "read_with_data_readers"]

log = logging.getLogger(__name__)


def _need_path(ctx: ReadContext, name: str, hint: str) -> Path:
    if ctx.path is None:
        raise ValueError(f"benchmark {name!r} needs its data: pass --data PATH (or data.eval_path); {hint}")
    if not ctx.path.exists():
        raise FileNotFoundError(f"benchmark {name!r}: data path {str(ctx.path)!r} does not exist; {hint}")
    return ctx.path


def read_with_data_readers(ctx: ReadContext, fmt: str, image_base: str | None = None) -> list[Sample]:
    """Samples of ``ctx.path`` through the dataset readers (`mgpo_core.data.readers.read_rows`).

    Rows the readers drop (unreadable image, bad answer letter, ...) are logged with their reason and left
    out; the runner reports how many questions each score rests on, so a short benchmark is visible.
    Embedded images go to the shared content-addressed cache (``data.image_cache_dir``).
    """
    from mgpo_core.data.readers import read_rows

    assert ctx.path is not None
    samples, drops = [], Counter()
    for row in read_rows(ctx.path, fmt, ctx=rows_context(ctx.cfg, ctx.path, image_base)):
        if row.sample is None:
            drops[row.reason] += 1
            log.warning("%s: row dropped (%s): %s", row.location, row.reason, row.detail)
        else:
            samples.append(row.sample)
    if drops:
        log.warning("%s: %d rows dropped by the reader: %s", ctx.path, sum(drops.values()), dict(drops))
    return samples


def rows_context(cfg: Any, path: Path, image_base: str | None = None):  # noqa: ANN201
    """The dataset readers' context for a benchmark's data at ``path``: the config's caps and image cache, the
    option-shuffle seed, and the folders its images may be opened from (``_image_roots``). Evaluation and
    preflight read benchmark rows through it alike."""
    from mgpo_core.data.readers import ReadContext as RowsContext
    from mgpo_core.data.rows import ImageCache, ReadLimits

    cache = cfg.data.image_cache_dir or str(Path(cfg.state_dir) / "data" / "image-cache")
    return RowsContext(
        cache=ImageCache(cache),
        limits=ReadLimits(
            max_text_chars=cfg.data.filters.max_text_chars, max_row_bytes=cfg.data.filters.max_row_bytes
        ),
        # The first V* option is always the right one: the reader shuffles them with this seed (METHOD.md §5).
        shuffle_seed=cfg.data.shuffle_seed,
        shuffle_options=True,
        image_base=Path(image_base) if image_base else None,
        image_roots=_image_roots(path, image_base, cfg.data.root, cache),
    )


def _image_roots(path: Path, image_base: str | None, data_root: str | None, cache: str) -> tuple[Path, ...]:
    """Where a benchmark's images may be opened: its image root (``evaluation.image_roots.<name>``) or else the
    data file's folder, ``data.root`` when set, and the embedded-image cache. A row whose image path resolves
    elsewhere (``../``, an absolute path, a symlink out) is dropped as ``path_outside_root`` and counted."""
    from mgpo_core.data.readers import input_folder

    roots = [Path(image_base).resolve() if image_base else input_folder(path), Path(cache).resolve()]
    if data_root:
        roots.append(Path(data_root).resolve())
    return tuple(roots)


# -------------------------------------------------------------------------------- V*

VSTAR_HINT = (
    "give the V* Bench folder (direct_attributes/ and relative_position/ with <name>.jpg + <name>.json), "
    "its test_questions.jsonl, or its parquet file"
)


def _read_vstar(ctx: ReadContext) -> list[Sample]:
    path = _need_path(ctx, "vstar", VSTAR_HINT)
    return read_with_data_readers(ctx, "vstar" if path.is_dir() else "auto")


def _vstar_labels(sample: Sample) -> Mapping[str, str]:
    return {"category": sample_attr(sample, "category")}


# -------------------------------------------------------------------------------- HR-Bench

HRBENCH_HINT = (
    "give hr_bench_4k.tsv / hr_bench_8k.tsv (columns index, question, answer, category, A-D, "
    "cycle_category, image as base64)"
)


def _read_hrbench(ctx: ReadContext, name: str) -> list[Sample]:
    _need_path(ctx, name, HRBENCH_HINT)
    # The TSV holds base64 images; the reader decodes each once into the cache the crops are cut from.
    return read_with_data_readers(ctx, "hrbench")


def _hrbench_labels(sample: Sample) -> Mapping[str, str]:
    # category = single | cross (a Sample field); cycle_category = the option cycle (in Sample.meta).
    return {
        "category": sample_attr(sample, "category"),
        "cycle_category": sample_attr(sample, "cycle_category"),
    }


# -------------------------------------------------------------------------------- MME-RealWorld

MME_HINT = (
    "give the MME-RealWorld (or MME-RealWorld-Lite) JSON file; its Image paths resolve against its folder"
)


def _read_mme(ctx: ReadContext, name: str) -> list[Sample]:
    _need_path(ctx, name, MME_HINT)
    root = ctx.cfg.evaluation.image_roots.get(name)
    samples = read_with_data_readers(ctx, "mme-realworld", image_base=root)
    missing = [s.image_path for s in samples if not Path(s.image_path).exists()]
    if samples and missing:
        assert ctx.path is not None
        base = root or ctx.path.parent
        raise FileNotFoundError(
            f"benchmark {name!r}: {len(missing)} of {len(samples)} images do not exist under {base} "
            f"(e.g. {missing[0]}). MME-RealWorld publishes its images apart from its JSON: point the reader at "
            f"the image folder with --set evaluation.image_roots.{name}=/path/to/images "
            "(or `mgpo eval --image-root /path/to/images`)"
        )
    return samples


def _mme_labels(sample: Sample) -> Mapping[str, str]:
    return {"task": sample_attr(sample, "task"), "subtask": sample_attr(sample, "subtask")}


# -------------------------------------------------------------------------------- synthetic

SYNTHETIC_HINT = (
    "give a samples.jsonl written by the synthetic generator (or its folder), or no path to generate"
)


def _read_synthetic(ctx: ReadContext) -> list[Sample]:
    if ctx.path is None:
        d = ctx.cfg.data
        path = write_synthetic_split(
            ctx.work_dir / "synthetic", d.synthetic_eval, split="eval", **synthetic_options(ctx.cfg)
        )
    else:
        path = ctx.path / "samples.jsonl" if ctx.path.is_dir() else ctx.path
        if not path.is_file():
            raise FileNotFoundError(f"benchmark 'synthetic': {str(path)!r} does not exist; {SYNTHETIC_HINT}")
    return read_samples_jsonl(path)


def _synthetic_labels(sample: Sample) -> Mapping[str, str]:
    return {"category": sample.category} if sample.category else {}


# -------------------------------------------------------------------------------- validation

VALIDATION_HINT = (
    "the validation split the filter stage holds out of the training data (data.validation_rows > 0 writes "
    "<dataset>/validation.jsonl); checkpoint selection passes it"
)


def _read_validation(ctx: ReadContext) -> list[Sample]:
    path = _need_path(ctx, "validation", VALIDATION_HINT)
    path = path / "validation.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"benchmark 'validation': {str(path)!r} does not exist; {VALIDATION_HINT}")
    return read_samples_jsonl(path)


def _validation_scores(outcomes: Sequence[Outcome]) -> dict[str, float]:
    return accuracy(outcomes)


BUILTIN_BENCHMARKS: tuple[BenchmarkSpec, ...] = (
    BenchmarkSpec(
        name="vstar",
        description="V* Bench: 191 questions (115 direct attributes, 76 relative position); per category",
        read=_read_vstar,
        labels=_vstar_labels,
        aggregate=vstar_scores,
        prompt=strip_inline_choices,
        has_gt_boxes=True,
        data_hint=VSTAR_HINT,
    ),
    BenchmarkSpec(
        name="hrbench_4k",
        description="HR-Bench 4K: 800 rows = 200 questions x 4 option cycles; mean over cycle groups",
        read=lambda ctx: _read_hrbench(ctx, "hrbench_4k"),
        labels=_hrbench_labels,
        aggregate=hrbench_scores,
        data_hint=HRBENCH_HINT,
    ),
    BenchmarkSpec(
        name="hrbench_8k",
        description="HR-Bench 8K: 800 rows = 200 questions x 4 option cycles; mean over cycle groups",
        read=lambda ctx: _read_hrbench(ctx, "hrbench_8k"),
        labels=_hrbench_labels,
        aggregate=hrbench_scores,
        data_hint=HRBENCH_HINT,
    ),
    BenchmarkSpec(
        name="mme_realworld",
        description="MME-RealWorld (English): overall, per Task and per Subtask",
        read=lambda ctx: _read_mme(ctx, "mme_realworld"),
        labels=_mme_labels,
        aggregate=mme_realworld_scores,
        prompt=strip_inline_choices,
        data_hint=MME_HINT,
    ),
    BenchmarkSpec(
        name="mme_realworld_lite",
        description="MME-RealWorld-Lite: 1,919 questions; overall, per Task and per Subtask",
        read=lambda ctx: _read_mme(ctx, "mme_realworld_lite"),
        labels=_mme_labels,
        aggregate=mme_realworld_scores,
        prompt=strip_inline_choices,
        data_hint=MME_HINT,
    ),
    BenchmarkSpec(
        name="validation",
        description="The validation split held out of the training data (checkpoint selection): accuracy",
        read=_read_validation,
        labels=lambda sample: {},
        aggregate=_validation_scores,
        prompt=strip_inline_choices,
        data_hint=VALIDATION_HINT,
    ),
    BenchmarkSpec(
        name="synthetic",
        description="Synthetic V*-style set (generated locally): accuracy and grounding vs the target",
        read=_read_synthetic,
        labels=_synthetic_labels,
        aggregate=synthetic_scores,
        has_gt_boxes=True,
        needs_data=False,
        data_hint=SYNTHETIC_HINT,
    ),
)

for _spec in BUILTIN_BENCHMARKS:
    register_benchmark(_spec)


def available_benchmarks() -> list[str]:
    """Names of every registered benchmark, sorted."""
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec registered as ``name``; an unknown name raises KeyError listing the names (and a near one)."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(BENCHMARKS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KeyError(
            f"unknown benchmark {name!r}; {hint}registered benchmarks: {sorted(BENCHMARKS)}"
        ) from None
