"""Readers of the benchmark formats (METHOD.md §4): MME-RealWorld's JSON list, V* Bench folders (and its flat
``test_questions.jsonl`` / parquet variant) and HR-Bench TSVs; one DataRow per input row, never a raise.

V*'s first option is always the correct one, so options are shuffled with a seed keyed on the question (the
order does not depend on reading order) and the answer letter follows its option; ``[x, y, w, h]`` boxes become
corners. HR-Bench images are base64 in the TSV: each is decoded once into the content-addressed image cache.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mgpo_core.data.rows import (
    RowError,
    answer_letter,
    check_choices,
    contained,
    image_ref,
    iter_lines,
    make_sample,
    split_options,
    strip_letter_prefixes,
    text_field,
    xywh_boxes,
)
from mgpo_core.data.schema import LETTERS, DataRow
from mgpo_core.data.tables import RawRow, ReadContext, bad_row, each_row, required, table_rows

VSTAR_FOLDERS = ("direct_attributes", "relative_position")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp")


# ---------------------------------------------------------------- MME-RealWorld


def read_mme_realworld_rows(path: Path, ctx: ReadContext) -> Iterator[DataRow]:
    """One row per item of the JSON list; ``Image`` resolves against the file's folder, ``Answer choices`` lose
    their ``(A)`` prefixes, and ``Task``/``Subtask``/``Category``/``Dataset`` go to ``meta`` for scoring.
    A file that is not a JSON list is one dropped row (nothing says how many questions it held)."""
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = "invalid_utf8" if isinstance(err, UnicodeDecodeError) else "unreadable_file"
        yield DataRow(str(path), None, reason, f"MME-RealWorld JSON cannot be read: {err}"[:500])
        return
    if not isinstance(items, list):
        yield DataRow(
            str(path),
            None,
            "unreadable_file",
            f"top level is a JSON {type(items).__name__}; MME-RealWorld is a list of questions",
        )
        return
    base = ctx.image_base or path.parent
    lim = ctx.limits

    def parse(loc: str, item: dict[str, Any]) -> Any:
        choices = check_choices(
            strip_letter_prefixes(check_choices(required(item, "Answer choices"), lim, "Answer choices")),
            lim,
            "Answer choices",
        )
        task = text_field(item, "Task", lim, required=False)
        subtask = text_field(item, "Subtask", lim, required=False)
        meta = {
            "task": task,
            "subtask": subtask,
            "category": text_field(item, "Category", lim, required=False),
            "dataset": text_field(item, "Dataset", lim, required=False),
            "question_type": text_field(item, "Question Type", lim, required=False),
        }
        return make_sample(
            id=f"mme-realworld/{text_field(item, 'Question_id', lim)}",
            image_path=image_ref(item.get("Image"), base, ctx.cache, "Image", ctx.image_roots),
            question=text_field(item, "Text", lim),
            choices=choices,
            answer=answer_letter(item.get("Ground truth"), choices, "Ground truth"),
            source="mme-realworld",
            category="/".join(x for x in (task, subtask) if x),
            meta=tuple((k, v) for k, v in meta.items() if v),
        )

    def rows() -> Iterator[RawRow]:
        for i, item in enumerate(items):
            loc = f"{path}[{i}]"
            if isinstance(item, dict):
                yield loc, item
            else:
                yield bad_row(
                    loc, "bad_field_type", f"item is a JSON {type(item).__name__}, expected an object", item
                )

    yield from each_row(rows(), parse)


# ---------------------------------------------------------------- V* Bench


def _shuffled(options: list[str], answer_index: int, key: str, ctx: ReadContext) -> tuple[list[str], str]:
    """Options in a fixed pseudo-random order keyed on the question (independent of reading order)."""
    order = list(range(len(options)))
    if ctx.shuffle_options:
        random.Random(f"mgpo-options:{ctx.shuffle_seed}:{key}").shuffle(order)
    return [options[i] for i in order], LETTERS[order.index(answer_index)]


def read_vstar_folder(folder: Path, ctx: ReadContext) -> Iterator[DataRow]:
    """One row per ``<name>.json`` under ``direct_attributes/`` and ``relative_position/`` (sorted), its image
    the ``<name>.jpg`` (or .png, ...) beside it; a folder holding only ``test_questions.jsonl`` reads that."""
    lim = ctx.limits
    files = sorted(p for d in VSTAR_FOLDERS if (folder / d).is_dir() for p in (folder / d).glob("*.json"))
    if not files and (folder / "test_questions.jsonl").is_file():
        yield from read_vstar_table(folder / "test_questions.jsonl", ctx)  # the flat variant
        return

    def parse(loc: str, item: dict[str, Any]) -> Any:
        json_path = Path(item.pop("__json_path"))
        category, name = json_path.parent.name, json_path.stem
        options = list(check_choices(required(item, "options"), lim, "options"))
        shuffled, answer = _shuffled(options, 0, f"{category}/{name}", ctx)
        image = next(
            (json_path.with_suffix(e) for e in _IMAGE_EXTS if json_path.with_suffix(e).is_file()),
            json_path.with_suffix(".jpg"),
        )
        targets = item.get("target_object")
        meta = (
            (("target_object", ", ".join(map(str, targets))),)
            if isinstance(targets, list) and targets
            else ()
        )
        return make_sample(
            id=f"vstar/{category}/{name}",
            image_path=contained(image, ctx.image_roots),
            question=text_field(item, "question", lim),
            choices=tuple(shuffled),
            answer=answer,
            source="vstar",
            category=category,
            gt_boxes=xywh_boxes(item.get("bbox")),
            meta=meta,
        )

    def rows() -> Iterator[RawRow]:
        for jp in files:
            loc = str(jp)
            try:
                item = json.loads(jp.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as err:
                yield bad_row(loc, "invalid_utf8", f"byte {err.start} is not UTF-8")
                continue
            except (OSError, ValueError) as err:
                yield bad_row(loc, "invalid_json", f"not JSON: {err}"[:500])
                continue
            if not isinstance(item, dict):
                yield bad_row(
                    loc, "bad_field_type", f"file holds a JSON {type(item).__name__}, expected an object"
                )
                continue
            item["__json_path"] = str(jp)
            yield loc, item

    yield from each_row(rows(), parse)


def read_vstar_table(path: Path, ctx: ReadContext) -> Iterator[DataRow]:
    """V*'s flat variants (parquet, or ``test_questions.jsonl``): ``text`` holds the question and its inline
    ``(A) ...`` options, ``label`` the letter; options are shuffled like the folder's and the label follows."""
    base = ctx.image_base or path.parent
    lim = ctx.limits

    def parse(loc: str, row: dict[str, Any]) -> Any:
        text = text_field(row, "text", lim)
        question, options = split_options(text)
        if len(options) < 2:
            raise RowError("bad_choices", f"'text' has no inline '(A) ... (B) ...' options: {text[:80]!r}")
        options = list(check_choices(options, lim))
        label = answer_letter(row.get("label"), options, "label")
        qid = text_field(row, "question_id", lim)
        shuffled, answer = _shuffled(options, LETTERS.index(label), f"qid/{qid}", ctx)
        return make_sample(
            id=f"vstar/{qid}",
            image_path=image_ref(row.get("image"), base, ctx.cache, roots=ctx.image_roots),
            question=question or text,
            choices=tuple(shuffled),
            answer=answer,
            source="vstar",
            category=text_field(row, "category", lim, required=False),
        )

    return each_row(table_rows(path, ctx), parse)


# ---------------------------------------------------------------- HR-Bench


_TOO_LONG = "\x00<row over max_row_bytes>\x00"


def _letter_columns(row: dict[str, Any]) -> list[str]:
    """Options from columns A, B, C, ... up to the first empty one; a filled column after a gap is an error,
    since lettering the rest would shift the answer onto the wrong option."""
    filled = [bool(isinstance(row.get(k), str) and row[k].strip()) for k in LETTERS]
    n = filled.index(False) if False in filled else len(filled)
    if any(filled[n:]):
        later = LETTERS[n + filled[n:].index(True)]
        raise RowError("bad_choices", f"option column {LETTERS[n]} is empty but {later} is not")
    return [row[k] for k in LETTERS[:n]]


def read_hrbench_rows(path: Path, ctx: ReadContext) -> Iterator[DataRow]:
    """One row per TSV line after the header; options are the non-empty single-letter columns, the base64
    image is decoded once into the cache, and a short number in ``image`` points at an earlier row's image
    (VLMEvalKit's way of storing a repeated image once). ``cycle_category`` goes to ``meta``."""
    lim = ctx.limits
    # The csv module's field cap is process-wide; rows are already bounded by iter_lines, so lift it.
    csv.field_size_limit(max(csv.field_size_limit(), lim.max_row_bytes))
    images_by_index: dict[str, str] = {}

    def lines(f: Any) -> Iterator[str]:
        for _, raw in iter_lines(f, lim.max_row_bytes):
            yield _TOO_LONG + "\n" if raw is None else raw.decode("utf-8", errors="surrogateescape")

    def parse(loc: str, row: dict[str, Any]) -> Any:
        index = text_field(row, "index", lim)
        choices = check_choices(_letter_columns(row), lim)
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise RowError("missing_field", "no 'image' (base64) in the row")
        if len(image) <= 16 and image.strip().isdigit():  # VLMEvalKit stores a repeated image once
            if image.strip() not in images_by_index:
                raise RowError(
                    "bad_image_ref", f"image refers to row index {image.strip()}, which holds no image"
                )
            image_path = images_by_index[image.strip()]
        else:
            image_path = str(ctx.cache.store_base64(image))
        images_by_index[index] = image_path
        cycle = text_field(row, "cycle_category", lim, required=False)
        return make_sample(
            id=f"hrbench/{path.stem}/{index}",
            image_path=image_path,
            question=text_field(row, "question", lim),
            choices=choices,
            answer=answer_letter(row.get("answer"), choices),
            source=path.stem,
            category=text_field(row, "category", lim, required=False),
            meta=(("cycle_category", cycle),) if cycle else (),
        )

    def rows() -> Iterator[RawRow]:
        try:
            f = path.open("rb")
        except OSError as err:
            yield bad_row(str(path), "unreadable_file", f"cannot open: {err.strerror}")
            return
        with f:
            reader = csv.reader(lines(f), delimiter="\t")
            header: list[str] | None = None
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    loc = f"{path}:{reader.line_num}"
                    yield bad_row(loc, "bad_row", f"TSV syntax: {err}")
                    continue
                if header is None:
                    header = [h.strip() for h in fields]
                    continue
                if not any(x.strip() for x in fields):
                    continue
                loc = f"{path}:{reader.line_num}"
                if fields == [_TOO_LONG]:
                    limit = lim.max_row_bytes
                    yield bad_row(
                        loc, "row_too_large", f"row longer than max_row_bytes={limit:,}; skipped unread"
                    )
                    continue
                if len(fields) != len(header):
                    detail = f"{len(fields)} fields, the header has {len(header)}"
                    yield bad_row(loc, "bad_row", detail, fields)
                    continue
                yield loc, dict(zip(header, fields, strict=True))

    yield from each_row(rows(), parse)
