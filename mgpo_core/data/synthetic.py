"""Synthetic V*-style high-resolution data: a small target in a cluttered large image, deterministic from a seed.

Each image holds one small target whose attribute (its colour) is hard to read at the overview resolution but
plain in a crop; the question asks for that attribute as a multiple-choice question with shuffled options, and the
sample carries the target's ground-truth box in original pixels.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from mgpo_core.data.schema import LETTERS, Sample

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("square", "circle", "triangle")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:  # noqa: ANN001
    x1, y1, x2, y2 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=fill)


def make_synthetic_image(
    rng: random.Random, width: int, height: int, *, target_frac: float = 0.03, clutter: int = 60
) -> tuple[Image.Image, dict]:
    """One image and its target: ``{"shape", "colour", "box": (x1, y1, x2, y2)}`` in pixels."""
    img = Image.new("RGB", (width, height), tuple(rng.randint(150, 200) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(clutter):  # grey-ish distractors: same shapes, no saturated colour
        w = rng.randint(width // 40 + 1, width // 8 + 2)
        h = rng.randint(height // 40 + 1, height // 8 + 2)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        g = rng.randint(60, 140)
        _draw_shape(draw, rng.choice(SHAPES), (x, y, x + w, y + h), (g, g + rng.randint(-10, 10), g))
    side = max(8, int(min(width, height) * target_frac))
    x, y = rng.randint(0, width - side - 1), rng.randint(0, height - side - 1)
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    _draw_shape(draw, shape, (x, y, x + side, y + side), COLOURS[colour])
    return img, {"shape": shape, "colour": colour, "box": (x, y, x + side, y + side)}


def iter_synthetic_samples(
    out_dir: str | Path,
    count: int,
    *,
    seed: int = 0,
    width: int = 1024,
    height: int = 768,
    split: str = "train",
    n_choices: int = 4,
) -> Iterator[Sample]:
    """Write ``count`` images under ``out_dir`` and yield their samples (deterministic from ``seed``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{split}")
    for i in range(count):
        img, target = make_synthetic_image(rng, width, height)
        path = out / f"{split}-{i:05d}.png"
        img.save(path)
        options = [
            target["colour"],
            *rng.sample([c for c in sorted(COLOURS) if c != target["colour"]], n_choices - 1),
        ]
        rng.shuffle(options)
        yield Sample(
            id=f"synthetic-{split}-{i:05d}",
            image_path=str(path),
            question=f"What is the colour of the small {target['shape']}?",
            choices=tuple(options),
            answer=LETTERS[options.index(target["colour"])],
            source="synthetic",
            category="colour",
            gt_boxes=(tuple(float(v) for v in target["box"]),),  # type: ignore[arg-type]
        )


def write_synthetic_split(out_dir: str | Path, count: int, **kw) -> Path:  # noqa: ANN003
    """Generate a split and write ``samples.jsonl`` beside the images; returns the JSONL path."""
    out = Path(out_dir)
    samples = list(iter_synthetic_samples(out, count, **kw))
    path = out / "samples.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples))
    tmp.replace(path)
    return path


def read_samples_jsonl(path: str | Path) -> list[Sample]:
    """Samples written by ``write_synthetic_split`` (canonical schema, one JSON object a line)."""
    return [
        Sample.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()
    ]
