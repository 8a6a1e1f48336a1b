"""Readers of the training formats: the canonical JSONL (``Sample.to_dict`` lines) and MGPO-style training tables
(parquet or JSONL rows with ``prompt``, ``image``/``image_path``, ``question``, a ``choices`` string,
``data_source`` and ``reward_model.ground_truth``)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mgpo_core.data.rows import (
    RowError,
    answer_letter,
    check_choices,
    excerpt,
    image_ref,
    make_sample,
    split_options,
    strip_letter_prefixes,
    text_field,
    xywh_boxes,
)
from mgpo_core.data.schema import DataRow
from mgpo_core.data.tables import ReadContext, each_row, json_lines, required, table_rows


def read_canonical_jsonl(path: Path, ctx: ReadContext) -> Iterator[DataRow]:
    """``Sample.to_dict()`` lines (``id``, ``image_path``, ``question``, ``choices`` list, ``answer`` letter,
    optional ``source``, ``category``, ``gt_boxes`` as corners, ``meta``); the answer may also be written
    ``(B)`` or as the text of its choice."""
    base = ctx.image_base or path.parent
    lim = ctx.limits

    def parse(loc: str, row: dict[str, Any]) -> Any:
        choices = check_choices(required(row, "choices"), lim)
        return make_sample(
            id=text_field(row, "id", lim),
            image_path=image_ref(row.get("image_path"), base, ctx.cache, "image_path", ctx.image_roots),
            question=text_field(row, "question", lim),
            choices=choices,
            answer=answer_letter(row.get("answer"), choices),
            source=text_field(row, "source", lim, required=False),
            category=text_field(row, "category", lim, required=False),
            gt_boxes=_corner_boxes(row.get("gt_boxes")),
            meta=_meta(row.get("meta")),
        )

    return each_row(json_lines(path, ctx), parse)


def _corner_boxes(raw: Any) -> tuple[tuple[float, float, float, float], ...]:
    """Canonical ``gt_boxes`` (already corners): validated as xywh after converting back, to share the checks."""
    if not raw:
        return ()
    if not isinstance(raw, list) or not all(isinstance(b, list) and len(b) == 4 for b in raw):
        raise RowError("bad_box", f"gt_boxes {excerpt(raw, 60)} is not a list of [x1, y1, x2, y2]")
    try:
        as_xywh = [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in raw]
    except TypeError:
        raise RowError("bad_box", f"gt_boxes {excerpt(raw, 60)} holds non-numbers") from None
    return xywh_boxes(as_xywh, "gt_boxes")


def _meta(raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise RowError("bad_field_type", f"'meta' is {type(raw).__name__}, expected an object of texts")
    return tuple((str(k), str(v)) for k, v in raw.items())


# ---------------------------------------------------------------- MGPO training tables


def _prompt_text(prompt: Any) -> str:
    """The last user message of a verl-style ``prompt`` (text or chat messages), image tokens removed."""
    if isinstance(prompt, str):
        return prompt.replace("<image>", "").strip()
    if isinstance(prompt, list):
        for msg in reversed(prompt):
            if isinstance(msg, Mapping) and msg.get("role", "user") == "user":
                content = msg.get("content")
                if isinstance(content, list):
                    content = " ".join(str(c.get("text", "")) for c in content if isinstance(c, Mapping))
                return str(content or "").replace("<image>", "").strip()
    return ""


def _ground_truth(row: Mapping[str, Any]) -> Any:
    rm = row.get("reward_model")
    if isinstance(rm, str):
        try:
            rm = json.loads(rm)
        except ValueError:
            raise RowError("bad_field_type", "'reward_model' is text that is not JSON") from None
    if isinstance(rm, Mapping):
        return rm.get("ground_truth")
    if rm is not None:
        raise RowError("bad_field_type", f"'reward_model' is {type(rm).__name__}, expected an object")
    for key in ("reward_model.ground_truth", "answer", "ground_truth"):
        if row.get(key) is not None:
            return row[key]
    return None


def read_mgpo_table(path: Path, ctx: ReadContext) -> Iterator[DataRow]:
    """MGPO/verl-style rows. The image is ``image_path`` or ``image`` (a path, bytes, or Hugging Face's
    ``{"bytes", "path"}`` struct; a one-element list of those too); the question is ``question``, else the text
    of the last user message in ``prompt``; ``choices`` is a ``"(A) ...\\n(B) ..."`` string or a list; the
    answer is ``reward_model.ground_truth`` (a struct, its JSON text, or a flattened column)."""
    base = ctx.image_base or path.parent
    lim = ctx.limits

    def parse(loc: str, row: dict[str, Any]) -> Any:
        question = text_field(row, "question", lim, required=False)
        if not question:
            prompt = _prompt_text(row.get("prompt"))
            if not prompt:
                raise RowError("missing_field", "no 'question' field and no text in 'prompt'")
            question = text_field({"prompt": prompt}, "prompt", lim)
        raw_choices = required(row, "choices")
        if isinstance(raw_choices, str):
            _, options = split_options(raw_choices)
            if len(options) < 2:
                raise RowError(
                    "bad_choices", f"'choices' {raw_choices[:80]!r} has no '(A) ... (B) ...' options"
                )
        else:
            options = raw_choices
        choices = check_choices(strip_letter_prefixes(check_choices(options, lim)), lim)
        image = next((row[k] for k in ("image_path", "image", "images") if row.get(k) is not None), None)
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), Mapping) else {}
        rid = row.get("id", extra.get("id", extra.get("index")))
        source = text_field(row, "data_source", lim, required=False)
        return make_sample(
            id=str(rid) if rid is not None else f"{path.stem}-{loc.rsplit(':', 1)[-1].rsplit('=', 1)[-1]}",
            image_path=image_ref(image, base, ctx.cache, roots=ctx.image_roots),
            question=question,
            choices=choices,
            answer=answer_letter(_ground_truth(row), choices, "reward_model.ground_truth"),
            source=source,
            category=text_field(row, "category", lim, required=False) or str(extra.get("category", "") or ""),
        )

    return each_row(table_rows(path, ctx), parse)
