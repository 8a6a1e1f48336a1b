"""Grounding quality of MGPO episodes: valid-box ratio, IoU with ground-truth boxes, and whether the crop cut
from the original image contains the ground-truth region.

The ground-truth region of a question is the box enclosing all its ground-truth boxes (V* relative-position
questions name two objects; a crop that answers them must hold both). IoU is measured in the pixels of the
overview the model saw (the ground truth is mapped there with `map_box_to_model`), so it judges the box the
model wrote, not our rounding of it. Containment is judged in original pixels on the integer crop box, with a
tolerance of one original pixel for that rounding. A question without a valid box gets IoU 0, coverage 0 and
"does not contain"; questions without ground truth are left out of the IoU/containment means.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from mgpo_core.grounding import GroundingResult, box_iou, map_box_to_model

__all__ = [
    "CONTAIN_TOLERANCE_PX",
    "GroundingOutcome",
    "aggregate_grounding",
    "enclosing_box",
    "grounding_outcome",
]

CONTAIN_TOLERANCE_PX = 1.0
"""Slack (original pixels) in the test that a crop holds the ground truth: the crop's edges were rounded."""

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroundingOutcome:
    """Grounding of one episode. ``iou``/``contains_gt``/``gt_coverage`` are None without ground truth.

    ``gt_coverage`` is the share of the ground-truth region's area inside the crop (1.0 when contained).
    """

    valid: bool
    reason: str
    iou: float | None
    contains_gt: bool | None
    gt_coverage: float | None


def enclosing_box(boxes: Sequence[Sequence[float]]) -> Box:
    """The smallest ``(x1, y1, x2, y2)`` box holding every box in ``boxes`` (at least one)."""
    if not boxes:
        raise ValueError("enclosing_box needs at least one box")
    return (
        min(float(b[0]) for b in boxes),
        min(float(b[1]) for b in boxes),
        max(float(b[2]) for b in boxes),
        max(float(b[3]) for b in boxes),
    )


def _area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def grounding_outcome(
    grounding: GroundingResult,
    crop_box: Sequence[int] | None,
    gt_boxes: Sequence[Sequence[float]],
    overview_size: tuple[int, int],
    original_size: tuple[int, int],
) -> GroundingOutcome:
    """Score one episode's box against the question's ground-truth boxes (original pixels, may be empty).

    ``grounding.box`` is in overview pixels (``overview_size``); ``crop_box`` is what was cut from the
    original (``original_size``), None when the box was invalid.
    """
    valid = bool(grounding.valid and grounding.box is not None and crop_box is not None)
    if not gt_boxes:
        return GroundingOutcome(valid, grounding.reason, None, None, None)
    gt = enclosing_box(gt_boxes)
    if not valid:
        return GroundingOutcome(False, grounding.reason, 0.0, False, 0.0)
    assert grounding.box is not None and crop_box is not None  # narrowed by `valid`
    gt_model = map_box_to_model(gt, original_size, overview_size)
    iou = box_iou(grounding.box, gt_model)
    cx1, cy1, cx2, cy2 = (float(v) for v in crop_box)
    t = CONTAIN_TOLERANCE_PX
    contains = cx1 <= gt[0] + t and cy1 <= gt[1] + t and cx2 >= gt[2] - t and cy2 >= gt[3] - t
    inter = (max(cx1, gt[0]), max(cy1, gt[1]), min(cx2, gt[2]), min(cy2, gt[3]))
    gt_area = _area(gt)
    coverage = 1.0 if contains or gt_area == 0 else _area(inter) / gt_area
    return GroundingOutcome(True, grounding.reason, iou, contains, coverage)


def aggregate_grounding(outcomes: Sequence[GroundingOutcome]) -> dict[str, float]:
    """Metric names under ``grounding/``; empty for no outcomes (direct mode has no grounding turn).

    ``valid_box_ratio`` over all questions; ``iou_mean``, ``crop_contains_gt`` and ``gt_coverage_mean`` over
    questions with ground truth (invalid box = 0); ``iou_mean_valid`` over those with a valid box too;
    ``reason/<code>`` the share of each parser reason code (``ok`` included).
    """
    if not outcomes:
        return {}
    n = len(outcomes)
    metrics = {"grounding/valid_box_ratio": sum(o.valid for o in outcomes) / n}
    with_gt = [o for o in outcomes if o.iou is not None]
    if with_gt:
        metrics["grounding/iou_mean"] = sum(o.iou or 0.0 for o in with_gt) / len(with_gt)
        metrics["grounding/crop_contains_gt"] = sum(bool(o.contains_gt) for o in with_gt) / len(with_gt)
        metrics["grounding/gt_coverage_mean"] = sum(o.gt_coverage or 0.0 for o in with_gt) / len(with_gt)
        valid_gt = [o for o in with_gt if o.valid]
        if valid_gt:
            metrics["grounding/iou_mean_valid"] = sum(o.iou or 0.0 for o in valid_gt) / len(valid_gt)
    for reason, count in sorted(Counter(o.reason for o in outcomes).items()):
        metrics[f"grounding/reason/{reason}"] = count / n
    return metrics
