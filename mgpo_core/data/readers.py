"""Readers of the published data formats (METHOD.md §4): each yields one :class:`DataRow` per input row, a
canonical :class:`Sample` or a drop with its reason, and never raises on a bad row.

Formats: ``mgpo`` (training tables, parquet or JSONL: ``prompt``, ``image``/``image_path``, ``question``, a
``choices`` string, ``data_source``, ``reward_model.ground_truth``), ``mme-realworld`` (one JSON list),
``vstar`` (a folder of per-image JSON; options shuffled with a fixed seed because the first is always correct;
``[x, y, w, h]`` boxes made corners), ``vstar-parquet`` (``image``, ``text`` with inline options, ``label``,
``category``, ``question_id``; also as JSONL), ``hrbench`` (TSV with base64 images, decoded once into a
content-addressed cache) and ``jsonl`` (the canonical schema, one object a line). Relative image paths resolve
against the input file's folder (or ``image_base``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from mgpo_core.data.benchmark_formats import (
    VSTAR_FOLDERS,
    read_hrbench_rows,
    read_mme_realworld_rows,
    read_vstar_folder,
    read_vstar_table,
)
from mgpo_core.data.formats import read_canonical_jsonl, read_mgpo_table
from mgpo_core.data.rows import ImageCache, ReadLimits, iter_lines
from mgpo_core.data.schema import DataRow, Sample
from mgpo_core.data.tables import ReadContext

__all__ = [
    "FORMATS",
    "DataInputError",
    "ImageCache",
    "ReadContext",
    "ReadLimits",
    "detect_format",
    "input_folder",
    "read_hrbench",
    "read_mme_realworld",
    "read_rows",
    "read_samples",
    "read_vstar",
    "resolve_format",
]

FORMATS = ("auto", "mgpo", "mme-realworld", "vstar", "vstar-parquet", "hrbench", "jsonl")
DEFAULT_IMAGE_CACHE = Path(".mgpo") / "data" / "image-cache"
log = logging.getLogger(__name__)


class DataInputError(ValueError):
    """An input that cannot be read at all (missing path, unknown format): a setup error, raised before any row."""


def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its kind, suffix and (for JSONL and parquet) its first row's fields."""
    p = Path(path)
    if p.is_dir():
        if any((p / d).is_dir() for d in VSTAR_FOLDERS) or (p / "test_questions.jsonl").is_file():
            return "vstar"
        raise DataInputError(
            f"{p}: a folder is read only as V* Bench (subfolders {VSTAR_FOLDERS}); "
            "pass a data file or --format"
        )
    suffix = p.suffix.lower()
    if suffix == ".tsv":
        return "hrbench"
    if suffix == ".json":
        return "mme-realworld"
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            names = set(pq.read_schema(p).names)
        except Exception as err:  # a broken file is reported row-wise by the reader itself
            raise DataInputError(f"{p}: cannot read the parquet schema ({err}); pass --format") from None
        return "vstar-parquet" if {"text", "label"} <= names else "mgpo"
    if suffix == ".jsonl":
        with p.open("rb") as f:
            for _, line in iter_lines(f, 16 * 1024 * 1024):
                try:
                    first = json.loads(line or b"")
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(first, dict):
                    keys = set(first)
                    if keys & {"reward_model", "reward_model.ground_truth", "data_source", "prompt"}:
                        return "mgpo"
                    if {"text", "label"} <= keys:
                        return "vstar-parquet"
                    return "jsonl"
        return "jsonl"
    raise DataInputError(f"{p}: cannot tell the format from suffix {suffix!r}; pass one of {FORMATS[1:]}")


def resolve_format(path: str | Path, fmt: str = "auto") -> str:
    """The concrete format ``path`` is read as; DataInputError when it cannot be read at all."""
    p = Path(path)
    if not p.exists():
        raise DataInputError(f"input {p} does not exist; check the --input path")
    if fmt not in FORMATS:
        raise DataInputError(f"unknown format {fmt!r}; use one of {FORMATS}")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if (fmt == "vstar") != p.is_dir():
        raise DataInputError(f"format {fmt!r} needs {'a folder' if fmt == 'vstar' else 'a file'}, got {p}")
    return fmt


def input_folder(path: str | Path) -> Path:
    """The folder an input's relative image paths live in by default: the input itself when it is a folder (V*),
    else the folder holding the file."""
    p = Path(path)
    return (p if p.is_dir() else p.parent).resolve()


def read_rows(path: str | Path, fmt: str = "auto", *, ctx: ReadContext) -> Iterator[DataRow]:
    """Every row of ``path`` as a DataRow, in file order. Raises only DataInputError (nothing to read), and
    that before the first row."""
    reader = _READERS[resolve_format(path, fmt)]
    return reader(Path(path), ctx)


_READERS: dict[str, Callable[[Path, ReadContext], Iterator[DataRow]]] = {
    "mgpo": read_mgpo_table,
    "mme-realworld": read_mme_realworld_rows,
    "vstar": read_vstar_folder,
    "vstar-parquet": read_vstar_table,
    "hrbench": read_hrbench_rows,
    "jsonl": read_canonical_jsonl,
}


# ---------------------------------------------------------------- list-returning conveniences (evaluation)


def read_samples(
    path: str | Path,
    fmt: str = "auto",
    *,
    image_dir: str | Path | None = None,
    seed: int = 0,
    limits: ReadLimits | None = None,
    image_roots: Sequence[str | Path] | None = None,
) -> list[Sample]:
    """The samples of ``path`` without the filter stage; dropped rows are logged (counts and first reasons).

    ``image_dir`` receives embedded images (default ``.mgpo/data/image-cache``); ``seed`` keys V*'s option
    shuffle. Image paths must stay inside ``image_roots`` (default: the input's folder; the cache is always
    allowed); rows escaping them are dropped as ``path_outside_root``. Use the filter stage
    (``run_filter_stage``) where every row must be accounted for in a report.
    """
    cache = ImageCache(image_dir or DEFAULT_IMAGE_CACHE)
    roots = image_roots if image_roots is not None else [input_folder(path)]
    ctx = ReadContext(cache, limits or ReadLimits(), shuffle_seed=seed,
                      image_roots=(*(Path(r).resolve() for r in roots), cache.root))  # fmt: skip
    samples, drops = [], []
    for row in read_rows(path, fmt, ctx=ctx):
        if row.sample is not None:
            samples.append(row.sample)
        else:
            drops.append(row)
    if drops:
        reasons = Counter(r.reason for r in drops)
        log.warning(
            "%s: %d of %d rows dropped (%s); first: %s: %s",
            path,
            len(drops),
            len(drops) + len(samples),
            dict(reasons),
            drops[0].location,
            drops[0].detail,
        )
    return samples


def read_vstar(path: str | Path, *, seed: int = 0, image_dir: str | Path | None = None) -> list[Sample]:
    """V* Bench from its folder, its ``test_questions.jsonl`` or its parquet (options shuffled with ``seed``)."""
    p = Path(path)
    fmt = "vstar" if p.is_dir() else "vstar-parquet"
    return read_samples(p, fmt, image_dir=image_dir, seed=seed)


def read_hrbench(path: str | Path, *, image_dir: str | Path | None = None) -> list[Sample]:
    """HR-Bench rows from ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv`` (images decoded once into ``image_dir``)."""
    return read_samples(path, "hrbench", image_dir=image_dir)


def read_mme_realworld(path: str | Path, *, image_dir: str | Path | None = None) -> list[Sample]:
    """MME-RealWorld (or its Lite subset) from the JSON list; ``Image`` paths resolve against its folder."""
    return read_samples(path, "mme-realworld", image_dir=image_dir)
