"""The filter stage: read inputs in any supported format, run the configured checks, and write a versioned
dataset directory named by its content hash, with a manifest and a report in which in = kept + dropped.

``run_filter_stage`` is the entry point the CLI and the Prefect task call (it never imports Prefect). Rows flow
through in chunks: cheap text checks first, then each distinct image is checked once by a small thread pool
(decoding and hashing release the GIL), then evaluation overlap (`mgpo_core.data.decontaminate`: a row whose
image belongs to a configured benchmark is dropped as ``eval_overlap``), then duplicates, and last the optional
pass-rate filter on the survivors. Row order is kept, so the same inputs and config give the same bytes.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from mgpo_core.data.decontaminate import EvalIndex, build_eval_index
from mgpo_core.data.filters import (
    Deduper,
    ImageCheck,
    answer_problem,
    check_image,
    containment_problem,
    pass_rate_problem,
    pass_rates,
)
from mgpo_core.data.output import FilterResult, write_dataset
from mgpo_core.data.readers import (
    DataInputError,
    ImageCache,
    ReadContext,
    ReadLimits,
    read_rows,
    resolve_format,
)
from mgpo_core.data.schema import DataRow

if TYPE_CHECKING:
    from mgpo_core.config import MGPOConfig
    from mgpo_core.rollout.base import RolloutEngine

__all__ = ["FilterResult", "InputSpec", "default_engine", "require_training_inputs", "run_filter_stage"]

log = logging.getLogger(__name__)
CHUNK_ROWS = 64


@dataclass(frozen=True)
class InputSpec:
    """One input: a file or folder, its format (``auto`` detects), and where relative image paths start
    (default: the file's own folder)."""

    path: str | Path
    format: str = "auto"
    image_base: str | Path | None = None


@dataclass
class _Kept:
    row: DataRow
    sha256: str | None


def _as_spec(item: InputSpec | str | Path) -> InputSpec:
    return item if isinstance(item, InputSpec) else InputSpec(item)


IMAGE_ROOT_HINT = (
    "MME-RealWorld publishes its images apart from its JSON: point relative image paths at the image folder "
    "with --set data.image_root=/path/to/images (evaluation: --set evaluation.image_roots.<benchmark>=DIR or "
    "`mgpo eval --image-root DIR`)"
)


def _hint_image_root(drops: list[DataRow], start: int, fmt: str, base: Path) -> None:
    """Missing images of an MME-RealWorld input: the drop says where they were looked for and how to fix it."""
    if fmt != "mme-realworld":
        return
    missing = 0
    for i in range(start, len(drops)):
        if drops[i].reason == "image_missing":
            drops[i] = replace(drops[i], detail=f"{drops[i].detail} (looked under {base}); {IMAGE_ROOT_HINT}")
            missing += 1
    if missing:
        log.warning("%d MME-RealWorld images not found under %s; %s", missing, base, IMAGE_ROOT_HINT)


def require_training_inputs(cfg: MGPOConfig, inputs: Sequence[object]) -> None:
    """Refuse a real model (``model.path`` set) with no training data unless ``data.allow_synthetic`` says the
    synthetic set is meant: a 7B preset must never train on the 64-image toy set by accident.

    Raises:
        DataInputError: no ``inputs``, no ``data.train_path``, a real model and synthetic data not allowed.
    """
    if inputs or cfg.data.train_path or not cfg.model.path or cfg.data.allow_synthetic:
        return
    raise DataInputError(
        f"model.path={cfg.model.path} is a real model but no training data was given, so the run would train "
        "on the small synthetic set. Give the data: `mgpo run --input <MME-RealWorld JSON>` (with "
        "--set data.image_root=<its image folder> when the images live apart), or --set data.allow_synthetic=true "
        "if training on the synthetic set is what you mean"
    )


def _default_root(spec: InputSpec) -> Path:
    p = Path(spec.path)
    return (p if p.is_dir() else p.parent).resolve()


def hold_out_validation(kept: list, n: int, seed: int) -> tuple[list, list]:
    """``(train, validation)``: the ``n`` kept rows with the smallest hash of (seed, row id) are held out, the
    rest keep their order. Deterministic, independent of input order; refuses to hold out everything."""
    import hashlib

    if n >= len(kept):
        raise ValueError(
            f"data.validation_rows={n} would hold out all {len(kept)} kept rows; lower it below {len(kept)}"
        )

    def rank(k) -> str:  # noqa: ANN001
        return hashlib.sha256(f"{seed}:{k.row.sample.id}".encode()).hexdigest()

    chosen = {id(k) for k in sorted(kept, key=rank)[:n]}
    return [k for k in kept if id(k) not in chosen], [k for k in kept if id(k) in chosen]


def run_filter_stage(
    cfg: MGPOConfig,
    inputs: Sequence[InputSpec | str | Path],
    out_root: str | Path,
    *,
    engine: RolloutEngine | None = None,
    progress: bool | None = None,
) -> FilterResult:
    """Filter ``inputs`` with ``cfg.data.filters`` into ``out_root/<content hash>/``.

    ``engine`` runs the pass-rate filter when ``data.filters.pass_rate`` is on (built from the config when None).
    ``progress`` shows tqdm bars (None: only on a terminal). Bad rows never raise; only an input that cannot be
    read at all (missing path, unknown format) raises :class:`DataInputError`, before anything is written.
    """
    t0 = time.perf_counter()
    f = cfg.data.filters
    specs = [_as_spec(i) for i in inputs]
    if not specs:
        raise DataInputError("no inputs given; pass at least one --input")
    formats = [resolve_format(s.path, s.format) for s in specs]  # setup errors surface before any row is read
    cache = ImageCache(cfg.data.image_cache_dir or Path(cfg.state_dir) / "data" / "image-cache")
    limits = ReadLimits(max_text_chars=f.max_text_chars, max_row_bytes=f.max_row_bytes)
    user_root = Path(cfg.data.root).resolve() if cfg.data.root else None
    # Before any row: a configured benchmark whose data cannot be read fails here, with the fix.
    index = build_eval_index(cfg) if f.eval_overlap else EvalIndex()

    run = _Checks(cfg, index)
    per_input: list[dict[str, Any]] = []
    bar = tqdm(desc="filter rows", unit="row", disable=None if progress is None else not progress)
    with ThreadPoolExecutor(max_workers=f.workers) as pool:
        for spec, fmt in zip(specs, formats, strict=True):
            ctx = ReadContext(
                cache,
                limits,
                shuffle_seed=cfg.data.shuffle_seed,
                image_base=Path(spec.image_base or cfg.data.image_root) if (spec.image_base or cfg.data.image_root) else None,
            )
            roots = [user_root or _default_root(spec), cache.root]
            if ctx.image_base is not None and user_root is None:  # images published apart from the file
                roots.append(ctx.image_base.resolve())
            before, drops_before = run.rows, len(run.drops)
            for chunk in _chunks(read_rows(spec.path, fmt, ctx=ctx), CHUNK_ROWS):
                run.check_chunk(chunk, roots, pool)
                bar.update(len(chunk))
            _hint_image_root(run.drops, drops_before, fmt, ctx.image_base or Path(spec.path).parent)
            per_input.append(
                {"path": str(Path(spec.path).resolve()), "format": fmt, "rows": run.rows - before}
            )
    bar.close()
    kept, drops = run.kept, run.drops
    t_checks = time.perf_counter() - t0

    pass_rate_summary: dict[str, Any] | None = None
    if f.pass_rate and kept:
        kept, pass_rate_summary = _apply_pass_rate(cfg, kept, engine, drops, progress)
    held: list = []
    if cfg.data.validation_rows and kept:
        kept, held = hold_out_validation(kept, cfg.data.validation_rows, cfg.data.shuffle_seed)
    return write_dataset(
        cfg,
        Path(out_root),
        kept=[(k.row, k.sha256) for k in kept],
        validation=[(k.row, k.sha256) for k in held],
        drops=drops,
        inputs=per_input,
        notes=dict(run.notes),
        pass_rate=pass_rate_summary,
        eval_overlap={
            **index.summary(),
            "dropped_rows": sum(d.reason == "eval_overlap" for d in drops),
            "per_benchmark": {**{b.name: 0 for b in index.benchmarks}, **dict(sorted(run.overlap.items()))},
        }
        if f.eval_overlap
        else None,
        timing={"checks_s": round(t_checks, 3), "total_s": round(time.perf_counter() - t0, 3)},
    )


class _Checks:
    """One run's checks and their state: the per-image results (each distinct file is checked once), the
    de-duplicator, the evaluation index and the overlap per benchmark, the ids seen, and the kept and dropped
    rows in input order."""

    def __init__(self, cfg: MGPOConfig, index: EvalIndex) -> None:
        self.f = cfg.data.filters
        self.max_image_pixels = cfg.data.max_image_pixels
        self.kept: list[_Kept] = []
        self.drops: list[DataRow] = []
        self.notes: Counter[str] = Counter()
        self.images: dict[Path, ImageCheck] = {}
        self.dedupe = Deduper(self.f.dedupe_key)
        self.index = index
        self.overlap: Counter[str] = Counter()
        self.ids: dict[str, str] = {}

    @property
    def rows(self) -> int:
        return len(self.kept) + len(self.drops)

    def check_chunk(self, chunk: list[DataRow], roots: list[Path], pool: ThreadPoolExecutor) -> None:
        """Text checks and containment, then the chunk's new images in parallel, then per-row image verdicts."""
        f = self.f
        pending: list[tuple[DataRow, Path]] = []
        for row in chunk:
            if row.sample is None:
                self.drops.append(row)
                continue
            problem = answer_problem(row.sample) if f.answer_validity else None
            path = Path(row.sample.image_path).resolve()
            if problem is None and f.path_containment:
                problem = containment_problem(path, roots)
            if problem is not None:
                self.drops.append(row.drop(*problem))
                continue
            pending.append((row, path))
        new = sorted({p for _, p in pending if p not in self.images})
        # Content hashes cost a full read of each file: only computed when de-duplicating or decontaminating.
        want_hash = f.dedupe or bool(self.index)
        results = pool.map(
            lambda p: check_image(p, f, max_image_pixels=self.max_image_pixels, want_hash=want_hash), new
        )
        self.images.update(zip(new, results, strict=True))
        for row, path in pending:
            self._image_verdict(row, path, self.images[path])

    def _image_verdict(self, row: DataRow, path: Path, check: ImageCheck) -> None:
        sample = row.sample
        assert sample is not None
        if check.reason:
            self.drops.append(row.drop(check.reason, check.detail))
            return
        if self.index and check.sha256 is not None:
            overlap = self.index.problem(sample, check.sha256)
            if overlap is not None:  # before de-duplication: every copy of an evaluation row is counted here
                self.overlap.update(name for name, _, _ in self.index.matches(check.sha256, sample.question))
                self.drops.append(row.drop(*overlap))
                return
        if self.f.dedupe and check.sha256 is not None:
            first = self.dedupe.seen(sample, check.sha256)
            if first is not None:
                detail = f"same image and question as {first!r} ({self.f.dedupe_key})"
                self.drops.append(row.drop("duplicate", detail))
                return
        if sample.id in self.ids:
            detail = f"id {sample.id!r} already used by {self.ids[sample.id]}"
            self.drops.append(row.drop("duplicate_id", detail))
            return
        self.ids[sample.id] = row.location
        if check.mode not in (None, "RGB"):
            self.notes[f"converted_from_{check.mode}"] += 1
        self.kept.append(_Kept(replace(row, sample=replace(sample, image_path=str(path))), check.sha256))


def _chunks(rows: Iterable[DataRow], size: int) -> Iterator[list[DataRow]]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def default_engine(cfg: MGPOConfig) -> RolloutEngine:
    """The rollout engine of ``cfg`` (``rollout.engine``) for the pass-rate filter."""
    from mgpo_core.rollout.factory import build_rollout_engine  # heavy imports stay lazy

    return build_rollout_engine(cfg)


def _apply_pass_rate(
    cfg: MGPOConfig,
    kept: list[_Kept],
    engine: RolloutEngine | None,
    drops: list[DataRow],
    progress: bool | None,
) -> tuple[list[_Kept], dict[str, Any]]:
    f = cfg.data.filters
    own = engine is None
    engine = default_engine(cfg) if engine is None else engine
    survivors: list[_Kept] = []
    histogram: Counter[str] = Counter()
    t0 = time.perf_counter()
    by_id = {k.row.sample.id: k for k in kept if k.row.sample is not None}
    samples = [k.row.sample for k in kept if k.row.sample is not None]
    try:
        with tqdm(
            total=len(samples),
            desc="pass rate",
            unit="prompt",
            disable=None if progress is None else not progress,
        ) as bar:
            for result in pass_rates(
                samples, engine, n=f.pass_rate_n, batch=f.pass_rate_batch, seed=cfg.algorithm.seed
            ):
                item = by_id[result.sample.id]
                if not result.error:
                    histogram[f"{result.right}/{result.n}"] += 1
                problem = pass_rate_problem(result, f)
                if problem is None:
                    survivors.append(item)
                else:
                    drops.append(item.row.drop(*problem))
                bar.update(1)
    finally:
        if own:
            engine.close()
    summary = {
        "n": f.pass_rate_n,
        "range": [f.pass_rate_min, f.pass_rate_max],
        "histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0].split("/")[0]))),
        "prompts": len(samples),
        "kept": len(survivors),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return survivors, summary
