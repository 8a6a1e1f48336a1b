"""Row sources shared by the readers: JSONL lines and parquet rows as ``(location, dict)`` pairs (bad lines
already turned into dropped rows), and the loop that turns each dict into a Sample or a reasoned drop."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgpo_core.data.rows import ImageCache, ReadLimits, RowError, dropped, excerpt, iter_lines
from mgpo_core.data.schema import DataRow

RawRow = tuple[str, dict[str, Any] | DataRow]


@dataclass(frozen=True)
class ReadContext:
    """What a reader needs besides the path: caps, the embedded-image cache, the option-shuffle seed."""

    cache: ImageCache
    limits: ReadLimits = field(default_factory=ReadLimits)
    shuffle_seed: int = 0
    shuffle_options: bool = True
    image_base: Path | None = None
    image_roots: tuple[Path, ...] | None = None
    """Resolved folders every image path must stay inside (``rows.contained``); None checks nothing at read time."""


def bad_row(loc: str, reason: str, detail: str, raw: Any = None) -> RawRow:
    """A dropped row at ``loc`` in the ``(location, row)`` form the row sources yield."""
    return loc, DataRow(loc, None, reason, detail, excerpt(raw) if raw is not None else "")


def json_lines(path: Path, ctx: ReadContext) -> Iterator[RawRow]:
    """``(location, row dict)`` per non-blank line, or ``(location, dropped DataRow)`` for a bad line."""
    try:
        f = path.open("rb")
    except OSError as err:
        yield bad_row(str(path), "unreadable_file", f"cannot open: {err.strerror}")
        return
    with f:
        for lineno, line in iter_lines(f, ctx.limits.max_row_bytes):
            loc = f"{path}:{lineno}"
            if line is None:
                limit = ctx.limits.max_row_bytes
                yield bad_row(
                    loc,
                    "row_too_large",
                    f"line longer than max_row_bytes={limit:,}; split it or raise data.filters.max_row_bytes",
                )
                continue
            if not line.strip():
                continue  # a blank line is not a row
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield bad_row(loc, "invalid_utf8", f"byte {err.start} is not UTF-8 ({err.reason})", line)
                continue
            try:
                row = json.loads(text)
            except ValueError as err:
                yield bad_row(loc, "invalid_json", f"not JSON: {err}", text)
                continue
            if not isinstance(row, dict):
                yield bad_row(
                    loc, "bad_field_type", f"row is a JSON {type(row).__name__}, expected an object", row
                )
                continue
            yield loc, row


def parquet_rows(path: Path, ctx: ReadContext) -> Iterator[RawRow]:
    """``(location, row dict)`` per parquet row (structs become dicts, binary becomes bytes), streamed 64 rows at
    a time, one row group after another.

    A corrupt row group costs only its own rows, each dropped as ``unreadable_file``; a file whose footer cannot
    be read counts as one dropped row.
    """
    try:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        sizes = [table.metadata.row_group(g).num_rows for g in range(table.metadata.num_row_groups)]
    except Exception as err:  # no footer: nothing says how many rows the file holds
        yield bad_row(
            str(path), "unreadable_file", f"parquet cannot be read: {type(err).__name__}: {err}"[:500]
        )
        return
    start = 0
    for group, size in enumerate(sizes):
        done = 0
        try:
            for batch in table.iter_batches(batch_size=64, row_groups=[group]):
                for row in batch.to_pylist():
                    yield f"{path}#row={start + done}", row
                    done += 1
        except Exception as err:  # a corrupt page: the rows it hides are dropped, never lost
            detail = f"parquet row group {group} cannot be read: {type(err).__name__}: {err}"[:500]
            for i in range(start + done, start + size):
                yield bad_row(f"{path}#row={i}", "unreadable_file", detail)
        start += size


def table_rows(path: Path, ctx: ReadContext) -> Iterator[RawRow]:
    """Rows of a parquet file or of a JSONL file, by suffix."""
    if path.suffix.lower() == ".parquet":
        return parquet_rows(path, ctx)
    return json_lines(path, ctx)


def each_row(rows: Iterator[RawRow], parse: Callable[[str, dict[str, Any]], Any]) -> Iterator[DataRow]:
    """``parse(location, row)`` → a kept DataRow; any exception → a dropped one (RowError keeps its reason)."""
    for loc, row in rows:
        if isinstance(row, DataRow):
            yield row
            continue
        try:
            yield DataRow(loc, parse(loc, row))
        except Exception as err:  # every failure becomes a reasoned drop: bad input never stops the stage
            yield dropped(loc, err, row)


def required(row: Mapping[str, Any], key: str) -> Any:
    """``row[key]``, or RowError ``missing_field`` when it is absent or null."""
    if row.get(key) is None:
        raise RowError("missing_field", f"no {key!r} field")
    return row[key]
