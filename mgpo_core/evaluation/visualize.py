"""The evaluation picture: a grid PNG of questions, each image downscaled with its ground-truth boxes (green)
and the crop the model chose (red) drawn in, under a caption with prediction, answer and verdict.

It is the artifact a person opens to see whether the model looks at the right place. Boxes are in original
pixels and are scaled with the thumbnail; originals are decoded one at a time and dropped after their tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mgpo_core.imaging import ImageError, open_image

__all__ = ["GT_COLOUR", "PRED_COLOUR", "PictureItem", "draw_eval_grid", "draw_tile"]

GT_COLOUR = (0, 200, 0)
PRED_COLOUR = (230, 0, 0)
_CAPTION_LINES = 3
_LINE_H = 12
_BG = (30, 30, 30)


@dataclass(frozen=True)
class PictureItem:
    """One tile: the original image, its boxes in original pixels and caption lines."""

    image_path: str
    gt_boxes: tuple[tuple[float, float, float, float], ...] = ()
    crop_box: tuple[int, int, int, int] | None = None
    correct: bool | None = None
    caption: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> PictureItem:
        """From a per-sample record of the evaluator (``samples.jsonl``)."""
        pred = rec.get("prediction") or "-"
        verdict = "right" if rec.get("correct") else "wrong"
        box = rec.get("box_reason")
        lines = [
            f"{rec.get('id', '?')}  pred {pred} / gt {rec.get('answer', '?')}  {verdict}",
            str(rec.get("question", ""))[:60],
            f"box: {box}" if box is not None else f"{rec.get('mode', '')} mode, no crop",
        ]
        crop = rec.get("crop_box")
        return cls(
            image_path=str(rec["image_path"]),
            gt_boxes=tuple(_box(b) for b in rec.get("gt_boxes") or ()),
            crop_box=None if crop is None else tuple(int(v) for v in crop),  # type: ignore[arg-type]
            correct=rec.get("correct"),
            caption=tuple(lines),
        )


def _box(values: Sequence[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


def _thumbnail(path: str, size: int, max_image_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """``(thumbnail, upright original size)``; a grey placeholder when the file cannot be read."""
    try:
        image = open_image(path, max_image_pixels=max_image_pixels)
    except ImageError:
        return Image.new("RGB", (size, size), (90, 90, 90)), (size, size)
    full = image.size
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    return image, full


def draw_tile(item: PictureItem, size: int = 320, max_image_pixels: int = 100_000_000) -> Image.Image:
    """A ``size`` x (``size`` + caption) tile with the boxes of ``item`` drawn on its thumbnail."""
    thumb, (w0, h0) = _thumbnail(item.image_path, size, max_image_pixels)
    sx, sy = thumb.width / w0, thumb.height / h0
    draw = ImageDraw.Draw(thumb)
    width = max(2, size // 160)
    for box in item.gt_boxes:
        draw.rectangle([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], outline=GT_COLOUR, width=width)
    if item.crop_box is not None:
        c = item.crop_box
        draw.rectangle([c[0] * sx, c[1] * sy, c[2] * sx, c[3] * sy], outline=PRED_COLOUR, width=width)
    tile = Image.new("RGB", (size, size + _CAPTION_LINES * _LINE_H + 6), _BG)
    tile.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    font = ImageFont.load_default()
    text = ImageDraw.Draw(tile)
    colour = {True: (120, 230, 120), False: (255, 120, 120), None: (220, 220, 220)}[item.correct]
    for i, line in enumerate(item.caption[:_CAPTION_LINES]):
        text.text((4, size + 3 + i * _LINE_H), line, fill=colour if i == 0 else (220, 220, 220), font=font)
    return tile


def draw_eval_grid(
    items: Sequence[PictureItem],
    path: str | Path,
    *,
    columns: int = 4,
    tile: int = 320,
    title: str = "",
    max_image_pixels: int = 100_000_000,
) -> Path:
    """Write the tiles of ``items`` as one PNG grid, ``columns`` wide under a title band; return its path."""
    if not items:
        raise ValueError("draw_eval_grid needs at least one item to draw")
    cols = max(1, min(columns, len(items)))
    rows = (len(items) + cols - 1) // cols
    tiles = [draw_tile(it, tile, max_image_pixels) for it in items]
    th = tiles[0].height
    head = 20 if title else 0
    grid = Image.new("RGB", (cols * tile + (cols + 1) * 4, head + rows * th + (rows + 1) * 4), (0, 0, 0))
    if title:
        ImageDraw.Draw(grid).text((6, 4), title, fill=(255, 255, 255), font=ImageFont.load_default())
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        grid.paste(t, (4 + c * (tile + 4), head + 4 + r * (th + 4)))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    grid.save(tmp, format="PNG")
    tmp.replace(out)
    return out
