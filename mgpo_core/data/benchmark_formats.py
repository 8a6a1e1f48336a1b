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
    excerpt,
    image_ref,
    iter_lines,
    make_sample,
    split_options,
    strip_letter_prefixes,
    text_field,
    xywh_boxes,
)
from mgpo_core.data.schema import LETTERS, DataRow
from mgpo_core.data.tables import RawRow, ReadContext, each_row, required, table_rows

VSTAR_FOLDERS = ("direct_attributes", "relative_position")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp")


# ---------------------------------------------------------------- MME-RealWorld


def read_mme_realworld_rows(path: Path, ctx: ReadContext) -> Iterator[DataRow]:
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = "invalid_utf8" if isinstance(err, UnicodeDecodeError) else "unreadable_file"
        yield DataRow(str(path), None, reason, f"MME-RealWorld JSON cannot be read: {err}"[:500])
        return
    if not isinstance(items, list):
        yield DataRow(str(path), None, "unreadable_file",
                      f"top level is a JSON {type(items).__name__}; MME-RealWorld is a list of questions")
        return
    base = ctx.image_base or path.parent
    lim = ctx.limits

    def parse(loc: str, item: dict[str, Any]) -> Any:
        choices = check_choices(strip_letter_prefixes(
            check_choices(required(item, "Answer choices"), lim, "Answer choices")), lim, "Answer choices")
        task = text_field(item, "Task", lim, required=False)
        subtask = text_field(item, "Subtask", lim, required=False)
        meta = {"task": task, "subtask": subtask,
                "category": text_field(item, "Category", lim, required=False),
                "dataset": text_field(item, "Dataset", lim, required=False),
                "question_type": text_field(item, "Question Type", lim, required=False)}
        return make_sample(
            id=f"mme-realworld/{text_field(item, 'Question_id', lim)}",
            image_path=image_ref(item.get("Image"), base, ctx.cache, "Image"),
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
                yield loc, DataRow(loc, None, "bad_field_type", f"item is a JSON {type(item).__name__}, "
                                   "expected an object", excerpt(item))

    yield from each_row(rows(), parse)


# ---------------------------------------------------------------- V* Bench


def _shuffled(options: list[str], answer_index: int, key: str, ctx: ReadContext) -> tuple[list[str], str]:
    """Options in a fixed pseudo-random order keyed on the question (independent of reading order)."""
    order = list(range(len(options)))
    if ctx.shuffle_options:
        random.Random(f"mgpo-options:{ctx.shuffle_seed}:{key}").shuffle(order)
    return [options[i] for i in order], LETTERS[order.index(answer_index)]


def read_vstar_folder(folder: Path, ctx: ReadContext) -> Iterator[DataRow]:
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
        image = next((json_path.with_suffix(e) for e in _IMAGE_EXTS if json_path.with_suffix(e).is_file()),
                     json_path.with_suffix(".jpg"))
        targets = item.get("target_object")
        meta = (("target_object", ", ".join(map(str, targets))),) if isinstance(targets, list) and targets else ()
        return make_sample(
            id=f"vstar/{category}/{name}",
            image_path=str(image),
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
                yield loc, DataRow(loc, None, "invalid_utf8", f"byte {err.start} is not UTF-8")
                continue
            except (OSError, ValueError) as err:
                yield loc, DataRow(loc, None, "invalid_json", f"not JSON: {err}"[:500])
                continue
            if not isinstance(item, dict):
                yield loc, DataRow(loc, None, "bad_field_type", f"file holds a JSON {type(item).__name__}, "
                                   "expected an object")
                continue
            item["__json_path"] = str(jp)
            yield loc, item

    yield from each_row(rows(), parse)


def read_vstar_table(path: Path, ctx: ReadContext) -> Iterator[DataRow]:
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
            image_path=image_ref(row.get("image"), base, ctx.cache),
            question=question or text,
            choices=tuple(shuffled),
            answer=answer,
            source="vstar",
            category=text_field(row, "category", lim, required=False),
        )

    return each_row(table_rows(path, ctx), parse)


# ---------------------------------------------------------------- HR-Bench


_TOO_LONG = "\x00<row over max_row_bytes>\x00"


def read_hrbench_rows(path: Path, ctx: ReadContext) -> Iterator[DataRow]:
    lim = ctx.limits
    # The csv module's field cap is process-wide; rows are already bounded by iter_lines, so lift it.
    csv.field_size_limit(max(csv.field_size_limit(), lim.max_row_bytes))
    images_by_index: dict[str, str] = {}

    def lines(f: Any) -> Iterator[str]:
        for _, raw in iter_lines(f, lim.max_row_bytes):
            yield _TOO_LONG + "\n" if raw is None else raw.decode("utf-8", errors="surrogateescape")

    def parse(loc: str, row: dict[str, Any]) -> Any:
        if any(v == _TOO_LONG for v in row.values()):
            raise RowError("row_too_large", f"row longer than max_row_bytes={lim.max_row_bytes:,}")
        index = text_field(row, "index", lim)
        options = [row[k] for k in LETTERS if isinstance(row.get(k), str) and row[k].strip()]
        choices = check_choices(options, lim)
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise RowError("missing_field", "no 'image' (base64) in the row")
        if len(image) <= 16 and image.strip().isdigit():  # VLMEvalKit stores a repeated image once
            if image.strip() not in images_by_index:
                raise RowError("bad_image_ref", f"image refers to row index {image.strip()}, which holds no image")
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
            yield str(path), DataRow(str(path), None, "unreadable_file", f"cannot open: {err.strerror}")
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
                    yield loc, DataRow(loc, None, "bad_row", f"TSV syntax: {err}")
                    continue
                if header is None:
                    header = [h.strip() for h in fields]
                    continue
                if not any(x.strip() for x in fields):
                    continue
                loc = f"{path}:{reader.line_num}"
                if len(fields) != len(header):
                    yield loc, DataRow(loc, None, "bad_row", f"{len(fields)} fields, the header has "
                                       f"{len(header)}", excerpt(fields))
                    continue
                yield loc, dict(zip(header, fields, strict=True))

    yield from each_row(rows(), parse)

