"""Decontamination: no training row may show an image, or ask a question about an image, of a configured
evaluation benchmark (DESIGN.md decision 13). Rows that do are dropped by the filter stage with reason
``eval_overlap``, counted per benchmark in its report.

What counts as overlap: the row's image has the same content (sha256 of the file's bytes) as an image of the
benchmark — whatever the question, since a model that trained on the picture has seen the answer's evidence —
and the detail says when the normalised question is the same too. MME-RealWorld-Lite, which the 7B preset
evaluates, is a subset of MME-RealWorld, the training source (METHOD.md §3: "English minus its Lite subset"):
this is what removes it.

Which benchmarks: every name in ``evaluation.benchmarks`` whose data is given, read from the path the
evaluation itself would read (``evaluation.data_paths[<name>]``, else ``data.eval_path``) through the same
benchmark readers (`mgpo_core.evaluation.benchmarks`). A benchmark without data (the synthetic one generates its
own, from a stream the training set never draws from) is listed as not checked. The index of a benchmark
(hashes and questions) is cached as JSON under ``<state>/data/eval-index/``, keyed by the data's path, sizes
and modification times, so `find_eval_overlap` is cheap enough for a preflight check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgpo_core.data.schema import Sample

if TYPE_CHECKING:
    from mgpo_core.config import MGPOConfig

__all__ = [
    "BenchmarkIndex",
    "EvalIndex",
    "EvalOverlapError",
    "build_eval_index",
    "file_sha256",
    "find_eval_overlap",
    "normalize_question",
    "overlap_report",
]

log = logging.getLogger(__name__)
INDEX_SCHEMA = "mgpo-eval-index/1"
_MAX_FINGERPRINT_FILES = 200_000


class EvalOverlapError(ValueError):
    """A configured benchmark's data cannot be read, so the training data cannot be checked against it."""


def normalize_question(text: str) -> str:
    """Case folded, inner whitespace collapsed: "What  colour?" and "what colour?" are the same question."""
    return " ".join(str(text).split()).casefold()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the file's bytes (the content hash the filter stage's de-duplication uses too)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class BenchmarkIndex:
    """One benchmark's images (content hash -> the first question id on it) and (hash, question) pairs."""

    name: str
    path: str
    questions: int
    images: Mapping[str, str]
    pairs: Mapping[tuple[str, str], str]


@dataclass(frozen=True)
class EvalIndex:
    """Every checked benchmark's index, and the configured benchmarks that were not checked (with why)."""

    benchmarks: tuple[BenchmarkIndex, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(b.images for b in self.benchmarks)

    def matches(self, sha256: str, question: str) -> list[tuple[str, str, bool]]:
        """``(benchmark, its question id, same question too)`` for each benchmark holding this image."""
        q = normalize_question(question)
        out = []
        for b in self.benchmarks:
            qid = b.pairs.get((sha256, q))
            if qid is not None:
                out.append((b.name, qid, True))
            elif sha256 in b.images:
                out.append((b.name, b.images[sha256], False))
        return out

    def problem(self, sample: Sample, sha256: str) -> tuple[str, str] | None:
        """``("eval_overlap", detail)`` when the row's image (or image and question) is in a benchmark."""
        hits = self.matches(sha256, sample.question)
        if not hits:
            return None
        parts = [
            f"{name} {qid!r}" + (" (same question)" if same else " (same image)") for name, qid, same in hits
        ]
        return "eval_overlap", "evaluation data in training: " + "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        """What was checked: questions and distinct images per benchmark, and what was not checked."""
        return {
            "checked": {
                b.name: {"path": b.path, "questions": b.questions, "images": len(b.images)}
                for b in self.benchmarks
            },
            "not_checked": dict(self.skipped),
        }


def _fingerprint(path: Path) -> list[Any]:
    """Size and modification time of the data file, or of every file under a data folder (V*'s layout)."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    files = []
    for i, p in enumerate(sorted(q for q in path.rglob("*") if q.is_file())):
        if i >= _MAX_FINGERPRINT_FILES:
            break
        st = p.stat()
        files.append([p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns])
    return files


def _cache_file(cfg: MGPOConfig, name: str, path: Path) -> Path:
    key = {
        "schema": INDEX_SCHEMA,
        "benchmark": name,
        "path": str(path),
        "files": _fingerprint(path),
        "image_root": cfg.evaluation.image_roots.get(name),
        "data_root": cfg.data.root,
        "shuffle_seed": cfg.data.shuffle_seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.state_dir) / "data" / "eval-index" / f"{name}-{digest}.json"


def _read_cached(cache: Path, name: str, path: Path) -> BenchmarkIndex | None:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("schema") != INDEX_SCHEMA:
            return None
        pairs = {(sha, q): qid for sha, q, qid in data["pairs"]}
        return BenchmarkIndex(name, str(path), int(data["questions"]), dict(data["images"]), pairs)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: rebuilt


def _write_cached(cache: Path, index: BenchmarkIndex) -> None:
    data = {
        "schema": INDEX_SCHEMA,
        "benchmark": index.name,
        "path": index.path,
        "questions": index.questions,
        "images": dict(index.images),
        "pairs": [[sha, q, qid] for (sha, q), qid in index.pairs.items()],
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    tmp.replace(cache)


def _index_benchmark(cfg: MGPOConfig, name: str, path: Path) -> BenchmarkIndex:
    from mgpo_core.evaluation.benchmarks import get_benchmark
    from mgpo_core.evaluation.spec import ReadContext

    spec = get_benchmark(name)
    work = Path(cfg.state_dir) / "data" / "eval-index" / "work" / name
    try:
        samples = spec.read(ReadContext(path, work, cfg))
    except (OSError, ValueError) as err:
        raise EvalOverlapError(
            f"cannot read benchmark {name!r}'s data at {path} to check the training data against it: {err}. "
            f"Fix evaluation.data_paths.{name} (the evaluation would fail on it too), or turn the check off "
            "with --set data.filters.eval_overlap=false"
        ) from err
    if not samples:
        raise EvalOverlapError(
            f"benchmark {name!r}: its reader found no questions in {path} (see the log for the dropped rows), so "
            f"the training data cannot be checked against it. Fix evaluation.data_paths.{name} (the evaluation "
            "would fail on it too), or turn the check off with --set data.filters.eval_overlap=false"
        )
    hashes: dict[str, str] = {}
    images: dict[str, str] = {}
    pairs: dict[tuple[str, str], str] = {}
    for s in samples:
        key = str(Path(s.image_path).resolve())
        if key not in hashes:
            try:
                hashes[key] = file_sha256(key)
            except OSError as err:
                raise EvalOverlapError(
                    f"benchmark {name!r}: cannot read image {s.image_path} of question {s.id!r} ({err}); fix "
                    f"its data or evaluation.image_roots.{name}"
                ) from err
        sha = hashes[key]
        images.setdefault(sha, s.id)
        pairs.setdefault((sha, normalize_question(s.question)), s.id)
    return BenchmarkIndex(name, str(path), len(samples), images, pairs)


def build_eval_index(cfg: MGPOConfig, *, use_cache: bool = True) -> EvalIndex:
    """The index of every configured benchmark whose data is given (module docstring), cached per data version.

    Raises:
        EvalOverlapError: a configured benchmark's data exists in the config but cannot be read.
    """
    checked, skipped = [], {}
    for name in cfg.evaluation.benchmarks:
        given = cfg.evaluation.data_paths.get(name) or cfg.data.eval_path
        if not given:
            skipped[name] = "no data given (evaluation.data_paths / data.eval_path)"
            continue
        path = Path(given).resolve()
        if not path.exists():
            raise EvalOverlapError(
                f"benchmark {name!r}: data path {given} does not exist; fix evaluation.data_paths.{name} "
                "(the evaluation would fail on it too)"
            )
        cache = _cache_file(cfg, name, path)
        index = _read_cached(cache, name, path) if use_cache else None
        if index is None:
            index = _index_benchmark(cfg, name, path)
            _write_cached(cache, index)
        log.info(
            "eval-overlap index of %s: %d questions, %d images", name, index.questions, len(index.images)
        )
        checked.append(index)
    return EvalIndex(tuple(checked), skipped)


def find_eval_overlap(
    cfg: MGPOConfig, rows: Iterable[Sample], index: EvalIndex | None = None
) -> dict[str, Any]:
    """How many of ``rows`` (training samples) overlap each configured benchmark, without filtering anything.

    The preflight's check: ``{"rows": n, "overlapping_rows": k, "per_benchmark": {name: rows}, "examples":
    [...], "checked": ..., "not_checked": ...}``. A row on several benchmarks counts once in
    ``overlapping_rows`` and once under each benchmark. Images that cannot be read are counted in
    ``unreadable`` (the filter stage drops them for that reason anyway).
    """
    index = build_eval_index(cfg) if index is None else index
    per_benchmark: Counter[str] = Counter()
    hashes: dict[str, str | None] = {}
    n = overlapping = unreadable = 0
    examples: list[str] = []
    for s in rows:
        n += 1
        if not index:
            continue
        key = str(Path(s.image_path).resolve())
        if key not in hashes:
            try:
                hashes[key] = file_sha256(key)
            except OSError:
                hashes[key] = None
        sha = hashes[key]
        if sha is None:
            unreadable += 1
            continue
        found = index.problem(s, sha)
        if found is not None:
            overlapping += 1
            per_benchmark.update(name for name, _, _ in index.matches(sha, s.question))
            if len(examples) < 5:
                examples.append(f"{s.id}: {found[1]}")
    return {
        "rows": n,
        "overlapping_rows": overlapping,
        "per_benchmark": dict(sorted(per_benchmark.items())),
        "unreadable": unreadable,
        "examples": examples,
        **index.summary(),
    }


def _training_samples(cfg: MGPOConfig, inputs: Sequence[str | os.PathLike[str]]) -> Iterator[Sample]:
    """The samples of raw training inputs, read as the filter stage reads them (rows the readers drop skipped)."""
    from mgpo_core.data.readers import ImageCache, ReadContext, ReadLimits, read_rows

    f = cfg.data.filters
    ctx = ReadContext(
        ImageCache(cfg.data.image_cache_dir or Path(cfg.state_dir) / "data" / "image-cache"),
        ReadLimits(max_text_chars=f.max_text_chars, max_row_bytes=f.max_row_bytes),
        shuffle_seed=cfg.data.shuffle_seed,
        image_base=Path(cfg.data.image_root) if cfg.data.image_root else None,
    )
    for path in inputs:
        for row in read_rows(path, "auto", ctx=ctx):
            if row.sample is not None:
                yield row.sample


def overlap_report(cfg: MGPOConfig, inputs: Sequence[str | os.PathLike[str]]) -> dict[str, int]:
    """``{benchmark: training rows overlapping it}`` for raw training ``inputs`` (files or folders in any
    supported format), every checked benchmark listed (0 when clean). The preflight calls this before a run;
    the filter stage drops exactly these rows as ``eval_overlap``.

    Raises:
        EvalOverlapError: a configured benchmark's data cannot be read.
        mgpo_core.data.readers.DataInputError: an input cannot be read at all.
    """
    index = build_eval_index(cfg)
    found = find_eval_overlap(cfg, _training_samples(cfg, inputs), index)
    return {**{b.name: 0 for b in index.benchmarks}, **found["per_benchmark"]}
