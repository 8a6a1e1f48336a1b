"""Synthetic V*-style high-resolution data: one small white tag hidden in a large cluttered image, whose content
(a colour mark, a shape, or a letter/digit) is too small to read at the model's overview resolution but plain in
a crop of the original; deterministic from a seed (same seed, same arguments → the same bytes).

The question names the tag ("the small white tag") without giving its content away, the options are shuffled,
and each sample carries the tag's ground-truth box in original pixels. Grey decoy tags with their own content
make "any glyph in the image" guesses useless: the model has to find the white one and look closely.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mgpo_core.data.schema import LETTERS, Sample

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("square", "circle", "triangle", "diamond", "cross", "star")
# No look-alikes (O/0, I/1, S/5, B/8, Z/2, Q, G, D, J, W): the answer must be unambiguous in a clean crop.
CHARACTERS = "ACEFHKLMNPRTUVXY34679"
KINDS = ("colour", "shape", "text")
Kind = Literal["colour", "shape", "text"]

QUESTIONS: dict[str, str] = {
    "colour": "What is the colour of the mark on the small white tag?",
    "shape": "What shape is drawn on the small white tag?",
    "text": "Which letter or digit is written on the small white tag?",
}
VOCABULARY: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "text": tuple(CHARACTERS),
}

PAPER_MAX_PIXELS = 1280 * 28 * 28
INK = (25, 25, 25)
TAG_WHITE = (255, 255, 255)
JPEG_OPTIONS = {
    "quality": 95,
    "subsampling": 0,
}  # 4:4:4: chroma subsampling would smear the small colour mark
PNG_OPTIONS = {"compress_level": 1}  # level 1 encodes a textured 4K image ~3x faster than the default 6


@dataclass(frozen=True)
class Geometry:
    """How a synthetic set draws each image's size: an aspect ratio (width:height) from ``aspects`` and an area
    between ``area[0]`` and ``area[1]`` times the reference ``width x height``. The tag keeps its share of the
    image (its side scales with the square root of the area), so it has the same size in any overview at one
    pixel budget: findable there, its mark unreadable there, plain in a crop of the original."""

    name: str
    aspects: tuple[tuple[int, int], ...]
    area: tuple[float, float]

    def draw(self, rng: random.Random, width: int, height: int) -> tuple[int, int, float]:
        """``(width, height, linear scale against the reference)`` for one image."""
        a, b = rng.choice(self.aspects)
        factor = rng.uniform(*self.area)
        area = width * height * factor
        w = round(math.sqrt(area * a / b))
        return w, round(area / w), math.sqrt(factor)


GEOMETRIES: dict[str, Geometry | None] = {
    "fixed": None,
    # what training sees: six aspect ratios (overviews of 9x7, 7x9, 11x6, 6x11 and 8x8 visual tokens at the
    # tiny budget) and originals from 0.6 to 2 times the reference area
    "varied": Geometry("varied", ((4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (2, 1)), (0.6, 2.0)),
    # the held-out band, never drawn for training: aspect ratios between the trained ones (3:2 and 2:3 give
    # overview grids of 10x6 and 6x10 tokens, which no trained ratio gives; 5:4 and 4:5 a stretch none has) and
    # originals 2.2 to 2.8 times the reference area, larger than any trained one
    "heldout": Geometry("heldout", ((3, 2), (2, 3), (5, 4), (4, 5)), (2.2, 2.8)),
}
"""The named geometries (``data.synthetic_geometry``); docs/REPRODUCTION.md names the held-out band."""


def geometry_named(name: str) -> Geometry | None:
    if name not in GEOMETRIES:
        raise ValueError(f"unknown synthetic geometry {name!r}; use one of {sorted(GEOMETRIES)}")
    return GEOMETRIES[name]


def content_box(side: int, fraction: float = 0.6) -> tuple[int, int, int, int]:
    """Box ``(x1, y1, x2, y2)``, relative to a tag of ``side`` pixels, that its content fills (``fraction`` of
    the side, centred; 60 % by default)."""
    if not 0.05 <= fraction <= 0.9:
        raise ValueError(f"content fraction {fraction} must be between 0.05 and 0.9 of the tag side")
    margin = max(2, round(side * (1 - fraction) / 2))
    return margin, margin, side - margin, side - margin


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _shape_points(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: Any) -> None:
    """Draw one of :data:`SHAPES` (filled) inside ``box``."""
    x1, y1, x2, y2 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "cross":
        tx, ty = max(1, (x2 - x1) // 3), max(1, (y2 - y1) // 3)
        draw.rectangle((x1 + tx, y1, x2 - tx, y2), fill=fill)
        draw.rectangle((x1, y1 + ty, x2, y2 - ty), fill=fill)
    elif shape in SHAPES:
        draw.polygon(_shape_points(shape, box), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def render_tag(
    kind: str,
    value: str,
    side: int,
    *,
    background: tuple[int, int, int] = TAG_WHITE,
    mark_fraction: float = 0.6,
) -> Image.Image:
    """A ``side x side`` RGB tag: dark border, ``background`` fill, and its content (the attribute asked about).

    ``kind`` "colour" draws a disc of colour ``value``; "shape" draws shape ``value`` in ink; "text" writes the
    character ``value`` in ink, each filling ``mark_fraction`` of the side. The generator pastes exactly this
    image, so tests can use it as a template.
    """
    if kind not in VOCABULARY or value not in VOCABULARY[kind]:
        raise ValueError(f"render_tag: {value!r} is not a {kind!r} value; use one of {VOCABULARY.get(kind)}")
    tag = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(tag)
    draw.rectangle((0, 0, side - 1, side - 1), outline=INK, width=max(1, side // 14))
    box = content_box(side, mark_fraction)
    if kind == "colour":
        draw.ellipse(box, fill=COLOURS[value])
    elif kind == "shape":
        draw_shape(draw, value, box, INK)
    else:
        size = max(6, round((box[3] - box[1]) * 1.15))
        draw.text(
            ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), value, fill=INK, font=_font(size), anchor="mm"
        )
    return tag


def target_side(
    width: int,
    height: int,
    *,
    overview_max_pixels: int,
    min_target_px: int,
    max_overview_px: float,
    rng: random.Random,
) -> int:
    """Tag side in original pixels: at least ``min_target_px`` (legible in a crop) and, where the image is large
    enough for it, at most ``max_overview_px`` once downscaled to the overview (illegible there)."""
    scale = min(1.0, math.sqrt(overview_max_pixels / (width * height)))
    upper = max(min_target_px, min(2 * min_target_px, math.floor(max_overview_px / scale)))
    return rng.randint(min_target_px, upper)


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """Muted base colour, smooth low-frequency texture and a few large regions (cheap: no per-pixel Python)."""
    nprng = np.random.default_rng(rng.getrandbits(64))
    base = np.array([rng.randint(120, 175) for _ in range(3)], dtype=np.int16)
    lo_w, lo_h = max(2, width // 24), max(2, height // 24)
    noise = nprng.integers(-22, 23, size=(lo_h, lo_w, 3), dtype=np.int16)
    low = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    img = low.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 9)):
        w, h = rng.randint(width // 8, width // 2), rng.randint(height // 8, height // 2)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        tone = tuple(int(c) + rng.randint(-30, 25) for c in base)
        draw.rectangle((x, y, x + w, y + h), fill=tone)
    return img


def make_synthetic_image(
    rng: random.Random,
    width: int,
    height: int,
    *,
    kind: str | None = None,
    clutter_per_megapixel: float = 12.0,
    decoys_per_megapixel: float = 3.0,
    overview_max_pixels: int = PAPER_MAX_PIXELS,
    min_target_px: int = 16,
    max_overview_px: float = 4.0,
    mark_fraction: float = 0.6,
    decoys: int | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """One image and its target ``{"kind", "value", "box": (x1, y1, x2, y2), "content_box"}`` (original pixels).

    Clutter never reaches the brightness of the white tag, so "the small white tag" names exactly one object.
    ``mark_fraction`` is the share of the tag's side its content fills: a large tag with a small mark is easy to
    find in the overview yet needs a close-up to read (the tiny model's setting). ``decoys`` fixes the number of
    grey decoy tags (default: ``decoys_per_megapixel``, at least 2).
    """
    if width < 4 * min_target_px or height < 4 * min_target_px:
        raise ValueError(
            f"synthetic image {width}x{height} is too small for a {min_target_px}px tag; use at least "
            f"{4 * min_target_px}px per side"
        )
    kind = kind or rng.choice(KINDS)
    img = _background(rng, width, height)
    draw = ImageDraw.Draw(img)
    megapixels = width * height / 1e6
    short = min(width, height)
    for _ in range(max(10, round(clutter_per_megapixel * megapixels))):
        s = rng.randint(max(8, short // 90), max(16, short // 9))
        w, h = s, max(4, int(s * rng.uniform(0.4, 1.6)))
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        g = rng.randint(35, 185)
        tint = (g + rng.randint(-15, 15), g + rng.randint(-15, 15), g + rng.randint(-15, 15))
        if rng.random() < 0.15:
            draw.line((x, y, x + w, y + h), fill=tint, width=max(1, s // 12))
        else:
            draw_shape(draw, rng.choice(SHAPES), (x, y, x + w, y + h), tint)
    side = target_side(
        width,
        height,
        overview_max_pixels=overview_max_pixels,
        min_target_px=min_target_px,
        max_overview_px=max_overview_px,
        rng=rng,
    )
    n_decoys = max(2, round(decoys_per_megapixel * megapixels)) if decoys is None else decoys
    for _ in range(n_decoys):
        decoy_kind = rng.choice(KINDS)
        grey = rng.randint(140, 185)
        decoy = render_tag(
            decoy_kind,
            rng.choice(VOCABULARY[decoy_kind]),
            side,
            background=(grey, grey, grey),
            mark_fraction=mark_fraction,
        )
        img.paste(decoy, (rng.randint(0, width - side), rng.randint(0, height - side)))
    value = rng.choice(VOCABULARY[kind])
    # Keep the target a tag-width away from the border so any box around it can be cropped.
    x, y = rng.randint(side, width - 2 * side), rng.randint(side, height - 2 * side)
    img.paste(render_tag(kind, value, side, mark_fraction=mark_fraction), (x, y))
    c = content_box(side, mark_fraction)
    return img, {
        "kind": kind,
        "value": value,
        "box": (x, y, x + side, y + side),
        "content_box": (x + c[0], y + c[1], x + c[2], y + c[3]),
    }


def draw_options(rng: random.Random, kind: str, value: str, n_choices: int, shuffle: bool = True) -> list[str]:
    """The right value and ``n_choices - 1`` others; shuffled, or (``shuffle`` off) in the vocabulary's order."""
    vocab = VOCABULARY[kind]
    if not 2 <= n_choices <= len(vocab):
        raise ValueError(f"n_choices={n_choices} must be between 2 and {len(vocab)} for {kind!r} questions")
    options = [value, *rng.sample([v for v in vocab if v != value], n_choices - 1)]
    rng.shuffle(options)
    return options if shuffle else sorted(options, key=vocab.index)


def _one_sample(
    out: Path,
    split: str,
    i: int,
    seed: int,
    width: int,
    height: int,
    n_choices: int,
    kinds: tuple[str, ...],
    image_format: str,
    overview_max_pixels: int,
    min_target_px: int,
    mark_fraction: float = 0.6,
    decoys: int | None = None,
    shuffle_choices: bool = True,
    geometry_name: str = "fixed",
) -> Sample:
    # One generator per image: image i does not depend on how many came before (parallel and resumable).
    rng = random.Random(f"mgpo-synthetic:{seed}:{split}:{i}")
    geo = geometry_named(geometry_name)
    if geo is not None:
        width, height, scale = geo.draw(rng, width, height)
        min_target_px = max(8, round(min_target_px * scale))
    img, target = make_synthetic_image(
        rng,
        width,
        height,
        kind=rng.choice(kinds),
        overview_max_pixels=overview_max_pixels,
        min_target_px=min_target_px,
        mark_fraction=mark_fraction,
        decoys=decoys,
    )
    ext = "jpg" if image_format == "jpeg" else "png"
    path = out / f"{split}-{i:05d}.{ext}"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img.save(
        tmp,
        "JPEG" if image_format == "jpeg" else "PNG",
        **(JPEG_OPTIONS if image_format == "jpeg" else PNG_OPTIONS),
    )
    tmp.replace(path)
    options = draw_options(rng, target["kind"], target["value"], n_choices, shuffle_choices)
    return Sample(
        id=f"synthetic-{split}-{i:05d}",
        image_path=str(path),
        question=QUESTIONS[target["kind"]],
        choices=tuple(options),
        answer=LETTERS[options.index(target["value"])],
        source="synthetic",
        category=target["kind"],
        gt_boxes=(tuple(float(v) for v in target["box"]),),  # type: ignore[arg-type]
    )


def iter_synthetic_samples(
    out_dir: str | Path,
    count: int,
    *,
    seed: int = 0,
    width: int = 1024,
    height: int = 768,
    split: str = "train",
    n_choices: int = 4,
    kinds: Sequence[str] = KINDS,
    image_format: Literal["jpeg", "png"] = "jpeg",
    overview_max_pixels: int = PAPER_MAX_PIXELS,
    min_target_px: int = 16,
    mark_fraction: float = 0.6,
    decoys: int | None = None,
    shuffle_choices: bool = True,
    workers: int = 1,
    geometry: str = "fixed",
) -> Iterator[Sample]:
    """Write ``count`` images under ``out_dir`` and yield their samples in order (deterministic from ``seed``).

    ``kinds`` picks the attributes asked about; ``overview_max_pixels`` is the overview budget the tag must be
    illegible at (the paper's 1280·28² by default; pass ``rollout.max_pixels``); ``workers`` > 1 generates in
    that many processes (same bytes as one); ``mark_fraction`` and ``decoys`` as :func:`make_synthetic_image`;
    ``shuffle_choices`` off lists the options in the vocabulary's order (with all of it offered, each value
    always has the same letter); ``geometry`` names a :data:`GEOMETRIES` entry: ``fixed`` draws every image at
    ``width x height``, ``varied`` and ``heldout`` draw each image's aspect ratio and size around that reference
    (the tag scaled with the image). JPEG (quality 95, no chroma subsampling) encodes a 4K image an order
    of magnitude faster than PNG; ``image_format="png"`` gives lossless files.
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown synthetic kinds {bad or list(kinds)}; use a non-empty subset of {KINDS}")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format {image_format!r} is not 'jpeg' or 'png'")
    geometry_named(geometry)  # an unknown name fails here, before any file is written
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    make = functools.partial(
        _one_sample,
        out,
        split,
        seed=seed,
        width=width,
        height=height,
        n_choices=n_choices,
        kinds=tuple(kinds),
        image_format=image_format,
        overview_max_pixels=overview_max_pixels,
        min_target_px=min_target_px,
        mark_fraction=mark_fraction,
        decoys=decoys,
        shuffle_choices=shuffle_choices,
        geometry_name=geometry,
    )
    if workers <= 1 or count <= 1:
        for i in range(count):
            yield make(i)
        return
    # forkserver: forking a process that already holds torch's or BLAS's threads can deadlock the child.
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("forkserver")
    ) as pool:
        yield from pool.map(make, range(count), chunksize=max(1, count // (4 * workers)))


def write_synthetic_split(out_dir: str | Path, count: int, **kw: Any) -> Path:
    """Generate a split and write ``samples.jsonl`` beside the images (atomically); returns the JSONL path."""
    out = Path(out_dir)
    samples = list(iter_synthetic_samples(out, count, **kw))
    path = out / "samples.jsonl"
    tmp = path.with_name(f".samples.jsonl.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples))
    tmp.replace(path)
    return path


def write_synthetic_dataset(out_dir: str | Path, train: int, eval: int, **kw: Any) -> dict[str, Path]:  # noqa: A002
    """A train split under ``out_dir/train`` and an eval split under ``out_dir/eval`` (disjoint random streams).

    Returns ``{"train": jsonl path, "eval": jsonl path}``; ``kw`` as :func:`iter_synthetic_samples`.
    """
    out = Path(out_dir)
    return {
        split: write_synthetic_split(out / split, n, split=split, **kw)
        for split, n in (("train", train), ("eval", eval))
    }


def read_samples_jsonl(path: str | Path) -> list[Sample]:
    """Samples written by ``write_synthetic_split`` or the filter stage (canonical schema, one JSON object a line)."""
    return [
        Sample.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()
    ]


def synthetic_options(cfg: Any) -> dict[str, Any]:
    """The generator keyword arguments a config asks for (everything but the output folder, count and split).

    One place maps ``data.synthetic_*`` to :func:`iter_synthetic_samples`, so the filter stage, the synthetic
    benchmark, the demo and the base model's pre-training scenes draw the same kind of picture.
    """
    d = cfg.data
    return {
        "seed": d.shuffle_seed,
        "width": d.synthetic_width,
        "height": d.synthetic_height,
        "kinds": tuple(d.synthetic_kinds),
        "min_target_px": d.synthetic_tag_px,
        "mark_fraction": d.synthetic_mark_fraction,
        "decoys": d.synthetic_decoys,
        "n_choices": d.synthetic_choices,
        "shuffle_choices": d.synthetic_shuffle_choices,
        "geometry": d.synthetic_geometry,
    }


def synthetic_split_for(cfg: Any, split: str) -> Path:
    """The config's synthetic ``train`` or ``eval`` split under ``<state_dir>/data/``, generated once; its JSONL path.

    The folder name carries everything that shapes the split (seed, size, count, and a digest of the other
    generator options), so a cached split is reused only when it is the one the config asks for.
    """
    d = cfg.data
    count = d.synthetic_train if split == "train" else d.synthetic_eval
    opts = synthetic_options(cfg)
    name = f"synthetic-{d.shuffle_seed}-{d.synthetic_width}x{d.synthetic_height}-{split}{count}"
    extra = {k: opts[k] for k in ("kinds", "min_target_px", "mark_fraction", "decoys")}
    if extra != {"kinds": KINDS, "min_target_px": 16, "mark_fraction": 0.6, "decoys": None}:
        name += "-" + hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]
    if opts["geometry"] != "fixed":
        name += f"-{opts['geometry']}"
    out = Path(cfg.state_dir) / "data" / name
    jsonl = out / "samples.jsonl"
    if not jsonl.exists():
        write_synthetic_split(out, count, split=split, **opts)
    return jsonl
