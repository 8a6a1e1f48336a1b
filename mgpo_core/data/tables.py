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


def json_lines(path: Path, ctx: ReadContext) -> Iterator[RawRow]:
    """``(location, row dict)`` per non-blank line, or ``(location, dropped DataRow)`` for a bad line."""
    try:
        f = path.open("rb")
    except OSError as err:
        yield str(path), DataRow(str(path), None, "unreadable_file", f"cannot open: {err.strerror}")
        return
    with f:
        for lineno, line in iter_lines(f, ctx.limits.max_row_bytes):
            loc = f"{path}:{lineno}"
            if line is None:
                yield loc, DataRow(loc, None, "row_too_large", f"line longer than max_row_bytes="
                                   f"{ctx.limits.max_row_bytes:,}; split it or raise data.filters.max_row_bytes")
                continue
            if not line.strip():
                continue  # a blank line is not a row
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield loc, DataRow(loc, None, "invalid_utf8", f"byte {err.start} is not UTF-8 ({err.reason})",
                                   excerpt(line))
                continue
            try:
                row = json.loads(text)
            except ValueError as err:
                yield loc, DataRow(loc, None, "invalid_json", f"not JSON: {err}", excerpt(text))
                continue
            if not isinstance(row, dict):
                yield loc, DataRow(loc, None, "bad_field_type", f"row is a JSON {type(row).__name__}, expected "
                                   "an object", excerpt(row))
                continue
            yield loc, row


def parquet_rows(path: Path, ctx: ReadContext) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=64)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}#row={index}", row
                index += 1
    except Exception as err:  # a corrupt file or page: account for it as one unreadable row and stop
        yield str(path), DataRow(str(path), None, "unreadable_file", f"parquet cannot be read: "
                                 f"{type(err).__name__}: {err}"[:500])


def table_rows(path: Path, ctx: ReadContext) -> Iterator[RawRow]:
    if path.suffix.lower() == ".parquet":
        return parquet_rows(path, ctx)
    return json_lines(path, ctx)


def each_row(rows: Iterator[RawRow], parse: Callable[[str, dict[str, Any]], Any]
          ) -> Iterator[DataRow]:
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
