"""Row-level parsing shared by the readers: typed field access that fails with a reason code (never a crash),
bounded line reading, choice-list parsing, answer letters, and the content-addressed cache of embedded images."""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mgpo_core.data.schema import LETTERS, DataRow, Sample
from mgpo_core.reward import normalize_choice

#: Reason codes a reader may give a dropped row (the filters add their own).
READER_REASONS = (
    "unreadable_file",  # the whole input file cannot be parsed (counted as one row)
    "invalid_utf8",  # bytes that are not UTF-8, or unpaired surrogates in the text
    "invalid_json",  # a line or file that is not JSON
    "row_too_large",  # a line over data.filters.max_row_bytes (skipped without being read whole)
    "missing_field",  # a required field is absent or empty
    "bad_field_type",  # a field of the wrong type (a number where text is needed, a dict for a list, ...)
    "text_too_long",  # question or a choice over data.filters.max_text_chars
    "bad_choices",  # no parsable options, or more than 26
    "bad_answer",  # the ground truth is neither a letter nor the text of one of the choices
    "answer_not_in_choices",  # a letter beyond the last choice
    "bad_box",  # a ground-truth box that is not 4 numbers with positive width and height
    "image_undecodable",  # an embedded image that is not valid base64 / bytes
    "bad_image_ref",  # an HR-Bench image reference to a row that holds no image
    "path_outside_root",  # an image path resolving (symlinks followed) outside the reader's image roots
    "special_token_in_text",  # chat-control text such as <|im_end|>: it would break the two-turn prompt
    "bad_row",  # anything else a row can do wrong (the detail names the exception)
)

EXCERPT_CHARS = 240
# Unpaired surrogates: what "surrogateescape" decoding and JSON "\\ud800" escapes leave for invalid UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Qwen's chat and vision control tokens (<|im_end|>, <|image_pad|>, ...): a question holding one would be
# tokenized as the control token itself and end a turn or open an image span mid-prompt.
_SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")


class RowError(ValueError):
    """A row that cannot become a Sample; ``reason`` is one of :data:`READER_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"[{reason}] {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ReadLimits:
    """Caps every reader applies (from ``data.filters``): longer text or rows are dropped with a reason."""

    max_text_chars: int = 4096
    max_row_bytes: int = 256 * 1024 * 1024


def excerpt(raw: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable piece of a raw row for the report (long values such as base64 images cut short)."""
    if isinstance(raw, Mapping):
        parts = []
        for k, v in raw.items():
            if isinstance(v, bytes | bytearray):
                text = f"<{len(v)} bytes>"
            else:
                text = repr(v)
                if len(text) > 60:
                    text = text[:57] + "..."
            parts.append(f"{k}={text}")
        text = "{" + ", ".join(parts) + "}"
    elif isinstance(raw, bytes | bytearray):
        text = repr(bytes(raw[: limit + 1]))
    else:
        text = repr(raw)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dropped(location: str, err: Exception, raw: Any = None) -> DataRow:
    """The DataRow of a row that failed: a RowError keeps its reason, anything else becomes ``bad_row``."""
    if isinstance(err, RowError):
        reason, detail = err.reason, err.detail
    else:
        reason, detail = "bad_row", f"{type(err).__name__}: {err}"
    return DataRow(location, None, reason, detail[:500], excerpt(raw) if raw is not None else "")


def _check_text(text: str, name: str, limits: ReadLimits) -> str:
    if len(text) > limits.max_text_chars:
        raise RowError(
            "text_too_long",
            f"{name!r} has {len(text):,} characters > max_text_chars="
            f"{limits.max_text_chars:,}; shorten it or raise data.filters.max_text_chars",
        )
    if _SURROGATE.search(text):
        raise RowError("invalid_utf8", f"{name!r} holds bytes that are not UTF-8 (unpaired surrogates)")
    if (token := _SPECIAL_TOKEN.search(text)) is not None:
        raise RowError(
            "special_token_in_text",
            f"{name!r} contains the model control token {token.group(0)!r}; remove it",
        )
    return text


def text_field(
    row: Mapping[str, Any], key: str, limits: ReadLimits, *, required: bool = True, name: str | None = None
) -> str:
    """``row[key]`` as checked text: numbers become text; absent, empty, or non-scalar values raise RowError."""
    name = name or key
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError("missing_field", f"no {name!r} field (or it is empty)")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RowError("bad_field_type", f"{name!r} is {type(value).__name__}, expected text")
    return _check_text(str(value).strip(), name, limits)


def check_choices(choices: Sequence[Any], limits: ReadLimits, name: str = "choices") -> tuple[str, ...]:
    """Choice texts as a tuple of checked strings (1..26 of them)."""
    if isinstance(choices, str | bytes) or not isinstance(choices, Sequence):
        raise RowError("bad_field_type", f"{name!r} is {type(choices).__name__}, expected a list of texts")
    if not choices:
        raise RowError("bad_choices", f"{name!r} is empty")
    if len(choices) > len(LETTERS):
        raise RowError(
            "bad_choices", f"{name!r} has {len(choices)} options; at most {len(LETTERS)} can be lettered"
        )
    out = []
    for i, c in enumerate(choices):
        if isinstance(c, bool) or not isinstance(c, str | int | float):
            raise RowError("bad_field_type", f"{name}[{i}] is {type(c).__name__}, expected text")
        out.append(_check_text(str(c).strip(), f"{name}[{i}]", limits))
    return tuple(out)


_PAREN_MARK = re.compile(r"\(([A-Z])\)")
_LINE_MARK = re.compile(r"(?m)^[ \t]*\(?([A-Z])[.):][ \t]*")


def split_options(text: str) -> tuple[str, list[str]]:
    """``"Q?\\n(A) red\\n(B) blue\\nAnswer ..."`` → ``("Q?", ["red", "blue"])``.

    Options are marked ``(A)``, ``(B)``, ... anywhere, or ``A.`` / ``A)`` / ``A:`` at line starts, and must run
    A, B, C, ... in order (a stray ``(B)`` inside an option does not start a new one). The last option ends at
    its first line break, which cuts off trailing instructions. Returns ``(text, [])`` when fewer than two
    options are found.
    """
    for pattern in (_PAREN_MARK, _LINE_MARK):
        marks: list[re.Match[str]] = []
        for m in pattern.finditer(text):
            if m.group(1) == LETTERS[len(marks)]:
                marks.append(m)
                if len(marks) == len(LETTERS):
                    break
        if len(marks) >= 2:
            options = []
            for k, m in enumerate(marks):
                end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
                piece = text[m.end() : end].strip()
                if k + 1 == len(marks):
                    piece = piece.split("\n", 1)[0].strip()
                options.append(piece)
            return text[: marks[0].start()].strip(), options
    return text.strip(), []


_PREFIX = re.compile(r"^\s*\(?([A-Z])[).:]\s*")


def strip_letter_prefixes(options: Sequence[str]) -> list[str]:
    """``["(A) red", "(B) blue"]`` → ``["red", "blue"]``, only when every option carries its own letter."""
    matches = [_PREFIX.match(o) for o in options]
    if all(m is not None and m.group(1) == LETTERS[i] for i, m in enumerate(matches)):
        return [o[m.end() :].strip() for o, m in zip(options, matches, strict=True) if m is not None]
    return list(options)


def answer_letter(raw: Any, choices: Sequence[str], name: str = "answer") -> str:
    """The ground truth as a letter of ``choices``: ``"C"``, ``"(c)"``, ``"C. text"`` or the text of a choice."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise RowError("missing_field", f"no {name!r} (the ground-truth letter)")
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise RowError("bad_field_type", f"{name!r} is {type(raw).__name__}, expected a letter such as 'B'")
    text = str(raw).strip()
    letter = normalize_choice(text) if len(text) < 200 else None
    if letter is None:
        folded = [c.casefold() for c in choices]
        if text.casefold() in folded:
            return LETTERS[folded.index(text.casefold())]
        raise RowError(
            "bad_answer", f"{name} {text[:60]!r} is neither a choice letter nor one of the choices"
        )
    if letter not in LETTERS[: len(choices)]:
        raise RowError(
            "answer_not_in_choices",
            f"{name} {letter!r} is not one of the letters "
            f"{LETTERS[: len(choices)]} of the {len(choices)} choices",
        )
    return letter


def xywh_boxes(raw: Any, name: str = "bbox") -> tuple[tuple[float, float, float, float], ...]:
    """``[[x, y, w, h], ...]`` → ``((x1, y1, x2, y2), ...)`` in the same pixels; bad boxes raise ``bad_box``."""
    if raw is None:
        return ()
    if isinstance(raw, Sequence) and len(raw) == 4 and all(isinstance(v, int | float) for v in raw):
        raw = [raw]  # one box given flat
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise RowError("bad_box", f"{name!r} is {type(raw).__name__}, expected a list of [x, y, w, h]")
    boxes = []
    for i, b in enumerate(raw):
        ok = (
            isinstance(b, Sequence)
            and len(b) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in b)
        )
        if not ok or b[2] <= 0 or b[3] <= 0 or b[0] < 0 or b[1] < 0:
            raise RowError("bad_box", f"{name}[{i}] = {excerpt(b, 60)} is not [x, y, w, h] with w, h > 0")
        x, y, w, h = (float(v) for v in b)
        boxes.append((x, y, x + w, y + h))
    return tuple(boxes)


def make_sample(**fields: Any) -> Sample:
    """A Sample, with the schema's own ValueError turned into a RowError."""
    try:
        return Sample(**fields)
    except ValueError as err:
        raise RowError("answer_not_in_choices", str(err)) from None


def iter_lines(f: BinaryIO, max_row_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, raw line)``; a line over ``max_row_bytes`` gives ``None`` and is skipped in bounded reads."""
    lineno = 0
    while True:
        line = f.readline(max_row_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_row_bytes and not line.endswith(b"\n"):
            while True:  # drain the rest of the oversized line without holding it
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, None
            continue
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        yield lineno, line


_MAGIC = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


def _extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return ".img"


class ImageCache:
    """Embedded images written once to ``root/<sha[:2]>/<sha256><ext>``; the same bytes map to the same file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def store(self, data: bytes) -> Path:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest[:2] / f"{digest}{_extension(data)}"
        if path.is_file() and path.stat().st_size == len(data):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path

    def store_base64(self, text: str) -> Path:
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise RowError("image_undecodable", f"image field is not valid base64 ({err})") from None
        return self.store(data)


def contained(path: Path, roots: Sequence[Path] | None, name: str = "image") -> str:
    """``path`` as a string when it resolves (symlinks followed) inside one of ``roots`` (resolved folders); a
    ``path_outside_root`` RowError otherwise, so a data row cannot make a reader open ``/etc/shadow`` or
    ``../../secret.png``. ``roots=None`` checks nothing (the filter stage checks after reading, against
    ``data.root``, and counts the escapes in its report)."""
    if roots is None:
        return str(path)
    real = path.resolve()
    if any(real.is_relative_to(r) for r in roots):
        return str(path)
    raise RowError(
        "path_outside_root",
        f"{name!r} resolves to {real}, outside the image root(s) {[str(r) for r in roots]}; move the image under "
        "a root, or name its folder with data.root (training data) or evaluation.image_roots.<benchmark>",
    )


def image_ref(
    value: Any, base: Path, cache: ImageCache, name: str = "image", roots: Sequence[Path] | None = None
) -> str:
    """A row's image as a path string: a path (relative to ``base``; it must stay inside ``roots``, see
    ``contained``), raw bytes, or a ``{"bytes", "path"}`` struct as Hugging Face datasets store images
    (embedded bytes go to ``cache``, which is always allowed)."""
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise RowError(
                "bad_field_type", f"{name!r} holds {len(value)} images; MGPO samples have exactly one"
            )
        value = value[0]
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, bytes | bytearray) and data:
            return str(cache.store(bytes(data)))
        value = path
    if isinstance(value, bytes | bytearray):
        if not value:
            raise RowError("image_undecodable", f"{name!r} holds zero bytes")
        return str(cache.store(bytes(value)))
    if not isinstance(value, str) or not value.strip():
        raise RowError(
            "missing_field" if value is None or isinstance(value, str) else "bad_field_type",
            f"{name!r} is {'missing' if value is None else type(value).__name__}, expected an image "
            "path or image bytes",
        )
    if "\x00" in value:
        raise RowError("bad_field_type", f"{name!r} path contains a NUL character")
    path = Path(value.strip()).expanduser()
    return contained(path if path.is_absolute() else base / path, roots, name)
