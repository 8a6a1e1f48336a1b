"""Turn-1 grounding: parse the model's box from any text into a validated box with a reason code, and map
boxes between the model's ``W_in x H_in`` image and the original (METHOD.md §1.3-1.5)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "GROUNDING_REASONS",
    "GROUNDING_RULES",
    "GroundingOptions",
    "GroundingResult",
    "box_iou",
    "map_box_to_model",
    "map_box_to_original",
    "parse_grounding_box",
]

#: Every ``GroundingResult.reason``: ``ok`` or why no valid box came out, in the order the checks run.
GROUNDING_REASONS = (
    "ok",
    "no_json",  # no fenced ```json block (nor, when tolerated, bare JSON) in the text
    "bad_json",  # a fenced block that is not valid JSON
    "not_a_list",  # valid JSON but not a list (a single dict only counts when accept_unfenced is on)
    "empty_list",  # []
    "no_bbox",  # no dict item carries a "bbox_2d" key
    "bad_bbox",  # bbox_2d is not 4 ints (4 numbers with accept_float); bools never count
    "non_finite",  # bbox_2d holds NaN or +-Infinity
    "out_of_bounds",  # outside [0, W] x [0, H] (beyond clamp_tolerance)
    "degenerate",  # x1 >= x2 or y1 >= y2
    "too_small",  # a side <= min_side pixels
    "bad_aspect",  # max(w/h, h/w) >= max_aspect
)

#: Parts of ``GroundingResult.rule``: a base rule, then flags in this order, joined by '+'.
GROUNDING_RULES = ("fenced_json", "unfenced_json", "dict", "float", "clamped")

_FENCE_OPEN = "```json"
_FENCE_CLOSE = "```"
# Bare-JSON search tries at most this many brackets, so a pathological text costs bounded time.
_MAX_UNFENCED_TRIES = 512
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class GroundingOptions:
    """How tolerant the turn-1 parser is; the defaults are the reference's strict behaviour."""

    coord_mode: Literal["absolute", "relative1000"] = "absolute"
    """``absolute``: pixels of the image the model saw (Qwen2.5-VL); ``relative1000``: 0..1000 (Qwen3-VL)."""
    accept_float: bool = False
    """Accept non-integer numbers in bbox_2d (the reference requires 4 ints)."""
    accept_unfenced: bool = False
    """Fall back to bare JSON outside a ```json fence, and accept a single dict instead of a list."""
    clamp_tolerance: float = 0.0
    """Fraction of a side a box may spill outside the image and be clamped back; 0 = reject (reference)."""
    min_side: float = 28
    """Each side must be strictly longer than this many model pixels."""
    max_aspect: float = 100.0
    """The aspect ratio max(w/h, h/w) must be strictly below this."""
    first_item_only: bool = True
    """Judge only the first item with a well-formed bbox_2d (reference); False takes the first VALID item."""

    def __post_init__(self) -> None:
        if self.coord_mode not in ("absolute", "relative1000"):
            raise ValueError(f"grounding.coord_mode={self.coord_mode!r}; use 'absolute' or 'relative1000'")
        if not (math.isfinite(self.clamp_tolerance) and 0.0 <= self.clamp_tolerance < 1.0):
            raise ValueError(
                f"grounding.clamp_tolerance={self.clamp_tolerance}; use a fraction in [0, 1), 0 = off"
            )
        if not (math.isfinite(self.min_side) and self.min_side >= 0):
            raise ValueError(
                f"grounding.min_side={self.min_side}; use a finite number of pixels >= 0 (paper: 28)"
            )
        if not (self.max_aspect > 1.0):
            raise ValueError(f"grounding.max_aspect={self.max_aspect}; use a ratio above 1 (paper: 100)")

    @classmethod
    def strict(cls) -> GroundingOptions:
        """Reference parser: first fenced block, first 4-int item, no clamping, sides > 28, aspect < 100."""
        return cls()


@dataclass(frozen=True)
class GroundingResult:
    """Outcome of :func:`parse_grounding_box`.

    ``box`` is ``(x1, y1, x2, y2)`` in pixels of the ``W_in x H_in`` image the model saw, None when invalid.
    ``rule`` names the parsing rule that produced the candidate box (even when validation then rejected
    it), '' when no candidate box was found. ``block_end`` is the index in the text just after the selected
    JSON block (the reference truncates the assistant turn there), None when no block was selected.
    """

    box: tuple[float, float, float, float] | None
    valid: bool
    reason: str
    rule: str
    label: str | None
    block_end: int | None


@dataclass
class _Candidate:
    value: Any
    end: int
    rule: str


def _is_number(value: object) -> bool:
    # bool is an int subclass in Python: `true` in JSON must never count as a coordinate.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float is simply far outside the image
        return math.inf if value > 0 else -math.inf


def _qualifies(value: Any, allow_dict: bool) -> str | None:
    """None if ``value`` is a usable list of items, else the reason it is not."""
    if isinstance(value, dict) and allow_dict:
        return None
    if not isinstance(value, list):
        return "not_a_list"
    if not value:
        return "empty_list"
    if not any(isinstance(item, dict) for item in value):
        return "no_bbox"
    return None


def _fenced_candidates(text: str, allow_dict: bool) -> tuple[_Candidate | None, str | None]:
    """First fenced block that qualifies, else the reason the first fenced block failed (None: no block)."""
    first_reason: str | None = None
    start = text.find(_FENCE_OPEN)
    while start != -1:
        body_start = start + len(_FENCE_OPEN)
        close = text.find(_FENCE_CLOSE, body_start)
        if close == -1:  # an unclosed fence is not a block, and nothing after it can close one either
            break
        try:
            value = json.loads(text[body_start:close])
            reason = _qualifies(value, allow_dict)
        except (ValueError, RecursionError):  # ValueError covers JSONDecodeError and the int-digits limit
            reason = "bad_json"
        if reason is None:
            return _Candidate(value, close + len(_FENCE_CLOSE), "fenced_json"), None
        first_reason = first_reason or reason
        start = text.find(_FENCE_OPEN, close + len(_FENCE_CLOSE))
    return None, first_reason


def _unfenced_candidate(text: str) -> _Candidate | None:
    """First bare JSON list of dicts (or single dict) with a ``bbox_2d`` key anywhere in the text."""
    pos, tries = 0, 0
    while tries < _MAX_UNFENCED_TRIES:
        brackets = [i for i in (text.find("[", pos), text.find("{", pos)) if i != -1]
        if not brackets:
            return None
        pos = min(brackets)
        tries += 1
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            pos += 1
            continue
        items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        # Prose holds stray brackets ("[1]", "{x}"), so bare JSON must at least name a bbox_2d to be taken.
        if any(isinstance(item, dict) and "bbox_2d" in item for item in items):
            return _Candidate(value, end, "unfenced_json")
        pos = end  # skip the whole value so its inner lists are not mistaken for the answer
    return None


def _read_bbox(item: dict[str, Any], options: GroundingOptions) -> tuple[list[float] | None, str, bool]:
    """``(coords, reason, had_float)``: coords is None when bbox_2d is missing or malformed."""
    if "bbox_2d" not in item:
        return None, "no_bbox", False
    raw = item["bbox_2d"]
    if not isinstance(raw, list) or len(raw) != 4 or not all(_is_number(v) for v in raw):
        return None, "bad_bbox", False
    had_float = any(isinstance(v, float) for v in raw)
    if any(isinstance(v, float) and not math.isfinite(v) for v in raw):
        return None, "non_finite", had_float
    if had_float and not options.accept_float:
        return None, "bad_bbox", had_float
    return [_as_float(v) for v in raw], "ok", had_float


def _validate(
    coords: list[float], width: int, height: int, options: GroundingOptions
) -> tuple[tuple[float, float, float, float] | None, str, bool]:
    """``(box, reason, clamped)`` for pixel coords of a ``width x height`` image."""
    x1, y1, x2, y2 = coords
    if options.coord_mode == "relative1000":
        x1, x2 = x1 * width / 1000.0, x2 * width / 1000.0
        y1, y2 = y1 * height / 1000.0, y2 * height / 1000.0
    clamped = False
    limits = ((width, options.clamp_tolerance * width), (height, options.clamp_tolerance * height))
    fixed = []
    for i, v in enumerate((x1, y1, x2, y2)):
        side, slack = limits[i % 2]
        if not (-slack <= v <= side + slack):
            return None, "out_of_bounds", False
        c = min(max(v, 0.0), float(side))
        clamped = clamped or c != v
        fixed.append(c)
    x1, y1, x2, y2 = fixed
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return None, "degenerate", clamped
    if w <= options.min_side or h <= options.min_side:
        return None, "too_small", clamped
    if max(w / h, h / w) >= options.max_aspect:
        return None, "bad_aspect", clamped
    return (x1, y1, x2, y2), "ok", clamped


def parse_grounding_box(
    text: str, width: int, height: int, options: GroundingOptions = GroundingOptions()
) -> GroundingResult:
    """Parse and validate the turn-1 box of a ``width x height`` (``W_in x H_in``) image; never raises.

    Reference rule (the defaults): take the first ```json fenced block that parses to a non-empty list holding
    dicts, and in it the first dict whose ``bbox_2d`` is 4 ints; the box is valid iff ``0 <= x1 < x2 <= W``,
    ``0 <= y1 < y2 <= H``, both sides > ``min_side`` and aspect < ``max_aspect``. Tolerances (see
    :class:`GroundingOptions`) add the rule flags listed in :data:`GROUNDING_RULES`.

    Raises:
        ValueError: only for a non-positive ``width``/``height`` (a caller bug, not a model output).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"parse_grounding_box needs the model image size, got {width}x{height}")
    if not isinstance(text, str):
        return GroundingResult(None, False, "no_json", "", None, None)
    candidate, reason = _fenced_candidates(text, allow_dict=options.accept_unfenced)
    if candidate is None and options.accept_unfenced:
        candidate = _unfenced_candidate(text)
    if candidate is None:
        return GroundingResult(None, False, reason or "no_json", "", None, None)

    items = [candidate.value] if isinstance(candidate.value, dict) else candidate.value
    base = candidate.rule + ("+dict" if isinstance(candidate.value, dict) else "")
    first_failure: GroundingResult | None = None
    bbox_reason = "no_bbox"
    for item in items:
        if not isinstance(item, dict):
            continue
        coords, why, had_float = _read_bbox(item, options)
        if coords is None:
            # Keep the first malformed-bbox reason: it says most about what the model wrote.
            if bbox_reason == "no_bbox":
                bbox_reason = why
            continue
        box, why, clamped = _validate(coords, width, height, options)
        rule = base + ("+float" if had_float else "") + ("+clamped" if clamped else "")
        label = item.get("label") if isinstance(item.get("label"), str) else None
        result = GroundingResult(box, box is not None, why, rule, label, candidate.end)
        if result.valid or options.first_item_only:
            return result
        first_failure = first_failure or result
    if first_failure is not None:
        return first_failure
    return GroundingResult(None, False, bbox_reason, "", None, candidate.end)


def _check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"{name} must be (width, height) as positive ints, got {size!r}")
    return size[0], size[1]


def _check_box(name: str, box: Sequence[float]) -> tuple[float, float, float, float]:
    if len(box) != 4 or not all(_is_number(v) and math.isfinite(_as_float(v)) for v in box):
        raise ValueError(f"{name} must be 4 finite numbers (x1, y1, x2, y2), got {box!r}")
    return float(box[0]), float(box[1]), float(box[2]), float(box[3])


def _round_side(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Integer edges in ``[0, limit]`` with ``a < b`` for a span ``lo < hi`` of original pixels."""
    # Nearest rounding keeps each edge within half an original pixel of the model's box.
    a, b = math.floor(lo + 0.5), math.floor(hi + 0.5)
    if b <= a:  # thinner than a pixel: take the pixels it touches (edges then move by at most one pixel)
        a, b = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    a = min(max(a, 0), limit - 1)
    return a, min(max(b, a + 1), limit)


def map_box_to_original(
    box: Sequence[float], model_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Map a box in model pixels to integer pixels of the original: ``x_ori = x * W_ori / W_in`` per axis.

    Edges round to the nearest original pixel, so mapping back with :func:`map_box_to_model` lands within
    ``0.5 * W_in / W_ori`` model pixels (at most one model pixel whenever ``W_ori >= W_in / 2``, as for every
    overview). A box thinner than one original pixel (only when the original is much smaller than the model
    image) is widened to the pixels it touches. The result always satisfies ``0 <= x1 < x2 <= W_ori`` and
    ``0 <= y1 < y2 <= H_ori``.

    Raises:
        ValueError: sizes that are not positive ints, a non-finite box, or a box that is not a non-empty box
            inside the model image (map only boxes :func:`parse_grounding_box` accepted).
    """
    w_in, h_in = _check_size("model_size", model_size)
    w_ori, h_ori = _check_size("original_size", original_size)
    x1, y1, x2, y2 = _check_box("box", box)
    if not (0 <= x1 < x2 <= w_in and 0 <= y1 < y2 <= h_in):
        raise ValueError(
            f"box {tuple(box)} is empty or outside the {w_in}x{h_in} model image; validate it with "
            "parse_grounding_box first"
        )
    sx, sy = w_ori / w_in, h_ori / h_in
    ox1, ox2 = _round_side(x1 * sx, x2 * sx, w_ori)
    oy1, oy2 = _round_side(y1 * sy, y2 * sy, h_ori)
    return ox1, oy1, ox2, oy2


def map_box_to_model(
    box_ori: Sequence[float], original_size: tuple[int, int], model_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Inverse of :func:`map_box_to_original` without rounding: ``x = x_ori * W_in / W_ori`` per axis.

    Useful to compare a ground-truth box of the original with the model's box (:func:`box_iou`).
    """
    w_ori, h_ori = _check_size("original_size", original_size)
    w_in, h_in = _check_size("model_size", model_size)
    x1, y1, x2, y2 = _check_box("box_ori", box_ori)
    sx, sy = w_in / w_ori, h_in / h_ori
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; reversed or empty boxes have area 0."""
    ax1, ay1, ax2, ay2 = _check_box("a", a)
    bx1, by1, bx2, by2 = _check_box("b", b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0
