"""The synthetic pre-training tasks of the tiny base model: what a real VLM learnt before MGPO, in miniature.

A real base model (Qwen2.5-VL-7B) can already ground ("where is X" -> a ``bbox_2d`` JSON block in the pixels of
the image it sees) and read (a close-up + a multiple-choice question -> a letter), but under MGPO's two-turn
template it does not reliably trigger grounding by itself (the cold start). The tasks here give the tiny model
those two skills on images drawn by the same generator as the synthetic V*-style benchmark, with our own wording:
never MGPO's two-turn conversation and never its prompt texts, so the two-turn template has to elicit grounding
exactly as in the paper.

Tasks (each item is one single-turn conversation; only the reply is trained):

- ``name``: a close-up of the tag (mostly a tight crop) + "what colour is the mark?" -> the colour word (the
  first thing the vision path learns; staged first because mixed tasks starve it of gradient);
- ``read``: a close-up crop of the tag (cut and enlarged by the very functions the rollout uses) + a question with
  lettered options -> the colour seen, then ``\\boxed{X}`` (e.g. ``red \\boxed{C}``);
- ``square``: a white square centred on one visual token of a small flat picture -> the box of that token
  (the first grounding items: a tiny model needs this sharp, few-position task before any other box task
  depends on the image at all);
- ``spot``: ``locate`` on a smaller scene drawn at the same scale (a few visual tokens per side): where a
  tiny model first learns that a box depends on *where* the tag is (on the full 9x7-token overview it only
  learns the boxes' prior; a curriculum over the scene's size in tokens lets the position circuit form);
- ``locate``: the overview (resized exactly as the rollout resizes it) + a request to box the small white tag ->
  a fenced ``bbox_2d`` JSON list, coordinates snapped to the 28-px token grid;
- ``ask``: the overview + a question about the tag (no options) + a request, in our own words, to mark the part
  of the picture needed before answering -> the tag's box (what a real VLM's instruction tuning gives it: it
  *can* ground on request; whether MGPO's own wording triggers it is left to the cold start);
- ``read2``: the overview and a close-up as two images + a question with options -> ``red \\boxed{C}`` (the
  model learns to read the answer off the second picture when it shows the tag);
- ``guess``: the overview twice (no close-up) + a question with options -> the right letter, which cannot be seen:
  the model learns that without a close-up it can only guess;
- ``direct``: the overview + the bare question (no options; sometimes a short tail asking for a brief reply) ->
  a colour word straight away, usually a guess at these mark sizes. This is what a real VLM does with a bare
  question by default. With it, a question without options no longer always means "box first" (``ask``). The
  box request's own words decide, and MGPO's request, worded unlike both, meets a model that boxes only
  sometimes: the cold start.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from mgpo_core.data.schema import LETTERS, format_choices
from mgpo_core.data.synthetic import (
    VOCABULARY,
    draw_options,
    geometry_named,
    make_synthetic_image,
    render_tag,
)
from mgpo_core.grounding import map_box_to_original
from mgpo_core.imaging import crop_and_enlarge, resize_for_model

GRID = 28
"""Qwen2.5-VL's merged-patch size: one visual token per 28x28 pixels of the image the model sees."""

TASKS = ("square", "spot", "name", "read", "locate", "ask", "read2", "guess", "direct")

_LOCATE_REQUESTS = (
    "Locate the small white tag. Reply with its bounding box.",
    "Where is the small white tag in this picture? Give its box.",
    "Draw a bounding box around the small white tag.",
    "Find the white tag and answer with its bbox_2d.",
    "Point at the small white tag with a box in pixel coordinates.",
    "Show me where the white tag is.",
)
_NAME_REQUESTS = (
    "What colour is the mark on the white tag?",
    "Name the colour of the dot on the tag.",
    "Colour of the mark?",
)
_READ_TAILS = (
    "Reply with the letter of the right option in \\boxed{}.",
    "Answer with a single letter inside \\boxed{}.",
    "Which option is right? Write its letter in \\boxed{}.",
)
_ASK_TAILS = (
    "Do not answer yet. Box the part of the picture you would need to zoom into.",
    "Before you answer, mark the region that shows this with a bbox_2d.",
    "Answer later; for now reply with the JSON box of the spot to look at closely.",
    "Which part of the image holds the answer? Reply with its box only.",
)
_DIRECT_TAILS = ("", "", "Answer in one word.", "Just the colour, please.", "Keep it short.", "Tell me quickly.")
_OPTION_HEADERS = ("Options:", "Choices:", "Pick one of these:", "")
_TWO_IMAGE_LEADS = (
    "The first picture is a whole scene and the second one a close-up of part of it.",
    "Two pictures: a full view, then a zoomed part.",
    "Picture 1 shows everything, picture 2 a detail.",
)
_QUESTIONS = (
    "What is the colour of the mark on the small white tag?",
    "Which colour is the dot on the white tag?",
    "What colour is the mark on the tag?",
)
_FILLER = (
    "you are a helpful assistant that looks at pictures and answers questions about them . be brief and exact . "
    "the user may show one or more images . read them carefully before you reply . some pictures are large and "
    "detailed while others are small . keep your reply short . do not invent things that are not there . "
    "answer in the format the user asks for . think about colours shapes and where things are . a scene can "
    "hold many objects of many sizes . look at every part of it . when asked for a box give pixel numbers . "
    "when asked to choose write the letter . never write more than needed ."
).split(" . ")


def system_prompt(rng: random.Random) -> str:
    """A system prompt of random length (0 to 3 sentences) so the skills do not depend on the prompt."""
    k = rng.choice((0, 0, 1, 1, 2, 3))
    sentences = [rng.choice(_FILLER).strip() for _ in range(k)]
    return " ".join(s[:1].upper() + s[1:] + "." for s in sentences if s)


def grid_box(box: tuple[float, float, float, float], width: int, height: int, cells: int = 2) -> list[int]:
    """The smallest box on the 28-px grid that covers ``box`` and is at least ``cells`` cells per side.

    All four coordinates are multiples of 28 inside ``width x height``; with ``cells >= 2`` every side is
    above the 28-px validity minimum, so a box the model copies from here is always valid.
    """
    out = []
    for lo, hi, limit in ((box[0], box[2], width), (box[1], box[3], height)):
        a, b = math.floor(lo / GRID), math.ceil(hi / GRID)
        top = limit // GRID
        while b - a < cells:
            # grow toward the side with room, preferring the side nearer the box's centre
            if (a > 0 and (lo + hi) / 2 - a * GRID < b * GRID - (lo + hi) / 2) or b >= top:
                a -= 1
            else:
                b += 1
        out.append((max(0, a) * GRID, min(top, b) * GRID))
    (x1, x2), (y1, y2) = out
    return [x1, y1, x2, y2]


def centre_box(box: tuple[float, float, float, float], width: int, height: int, cells: int = 3) -> list[int]:
    """The ``cells x cells`` block of 28-px grid cells centred on the cell that holds ``box``'s centre (moved
    inward at the image's edges). One box per cell: which box to answer is a function of the one visual token
    the object sits on, the mapping a tiny model learns (a tight cover box also depends on where inside its
    cells the object lies); with ``cells`` 3 it holds any object up to 28 px wide in the image the model sees."""
    out = []
    for lo, hi, limit in ((box[0], box[2], width), (box[1], box[3], height)):
        n = limit // GRID
        c = min(n - 1, int((lo + hi) / 2 // GRID))
        a = min(max(0, c - cells // 2), max(0, n - cells))
        out.append((a * GRID, min(n, a + cells) * GRID))
    (x1, x2), (y1, y2) = out
    return [x1, y1, x2, y2]


def box_reply(box: list[int], label: str = "small white tag") -> str:
    """Qwen2.5-VL's grounding reply format: a fenced JSON list with one ``bbox_2d`` item."""
    return f'```json\n[{{"bbox_2d": [{box[0]}, {box[1]}, {box[2]}, {box[3]}], "label": "{label}"}}]\n```'


@dataclass
class Scene:
    """One generated picture: its overview (as the model sees it), the original (JPEG bytes), the tag."""

    overview: Image.Image
    original_jpeg: bytes
    original_size: tuple[int, int]
    tag_box: tuple[int, int, int, int]  # original pixels
    value: str
    mark_fraction: float = 0.25

    def original(self) -> Image.Image:
        return Image.open(io.BytesIO(self.original_jpeg)).convert("RGB")

    def tag_box_overview(self) -> tuple[float, float, float, float]:
        sx = self.overview.width / self.original_size[0]
        sy = self.overview.height / self.original_size[1]
        x1, y1, x2, y2 = self.tag_box
        return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


@dataclass(frozen=True)
class SceneSpec:
    """How pictures are drawn; the synthetic benchmark of the same preset uses the same numbers."""

    width: int = 1024
    height: int = 768
    min_pixels: int = 12544
    max_pixels: int = 50176
    min_target_px: int = 80
    mark_fraction: float = 0.25
    decoys: int = 2
    kind: str = "colour"
    choices: int = 4
    shuffle_choices: bool = True
    """Off: the options in the vocabulary's order (with ``choices`` = the whole vocabulary a colour always has
    the same letter, so reading is naming: a tiny model learns to name the colour it sees but not to look its
    letter up among shuffled options, docs/REPRODUCTION.md)."""
    geometry: str = "fixed"
    """Whole scenes' size (``mgpo_core.data.synthetic.GEOMETRIES``): ``fixed`` at ``width x height``; ``varied``
    draws each scene's aspect ratio and area as the ``varied`` synthetic set does, the tag scaled with it."""


def make_scene(
    seed: str | random.Random,
    spec: SceneSpec,
    mark_fraction: float | None = None,
    grid: tuple[int, int] | None = None,
    plain: bool = False,
    aligned: bool = False,
) -> Scene:
    """One picture drawn from ``seed``; ``mark_fraction`` overrides the spec's (the curriculum starts big).

    ``grid`` = (columns, rows): a smaller scene drawn at the spec's scale whose overview is exactly that many
    visual tokens (the ``spot`` task's size curriculum); the tag has the same size in the overview as in a
    full scene. ``plain``: the tag alone on a flat background (the curriculum's first pictures); ``aligned``
    (with ``plain`` and ``grid``): the tag centred on one visual token.
    """
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    mark = spec.mark_fraction if mark_fraction is None else mark_fraction
    width, height, max_px, decoys = spec.width, spec.height, spec.max_pixels, spec.decoys
    tag_px = spec.min_target_px
    geo = geometry_named(spec.geometry)
    if geo is not None and grid is None:
        width, height, scale = geo.draw(rng, width, height)
        tag_px = max(8, round(tag_px * scale))
    if grid is not None:
        scale = math.sqrt(spec.max_pixels / (spec.width * spec.height))
        width, height = round(grid[0] * GRID / scale), round(grid[1] * GRID / scale)
        max_px, decoys = grid[0] * grid[1] * GRID * GRID, rng.randint(0, spec.decoys)
    if plain:
        img, target = _plain_scene(rng, width, height, spec, mark, grid if aligned else None)
    else:
        img, target = make_synthetic_image(
            rng,
            width,
            height,
            kind=spec.kind,
            overview_max_pixels=max_px,
            min_target_px=tag_px,
            mark_fraction=mark,
            decoys=decoys,
        )
    if grid is None:
        overview = resize_for_model(img, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    else:
        overview = img.resize((grid[0] * GRID, grid[1] * GRID), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, subsampling=0)
    return Scene(overview, buf.getvalue(), img.size, tuple(target["box"]), target["value"], mark)


def _plain_scene(
    rng: random.Random, width: int, height: int, spec: SceneSpec, mark: float, grid: tuple[int, int] | None
) -> tuple[Image.Image, dict]:
    """The white tag alone on a flat muted background, placed as the generator places it (or, given the
    overview's ``grid``, centred on one of its cells)."""
    side = spec.min_target_px
    img = Image.new("RGB", (width, height), tuple(rng.randint(60, 175) for _ in range(3)))
    value = rng.choice(VOCABULARY[spec.kind])
    if grid is None:
        x, y = rng.randint(side, width - 2 * side), rng.randint(side, height - 2 * side)
    else:
        sx, sy = width / (grid[0] * GRID), height / (grid[1] * GRID)
        c, r = rng.randrange(grid[0]), rng.randrange(grid[1])
        x = min(width - side, max(0, round((c * GRID + GRID / 2) * sx - side / 2)))
        y = min(height - side, max(0, round((r * GRID + GRID / 2) * sy - side / 2)))
    img.paste(render_tag(spec.kind, value, side, mark_fraction=mark), (x, y))
    return img, {"value": value, "box": (x, y, x + side, y + side)}


def square_item(rng: random.Random, grid: tuple[int, int]) -> PretrainItem:
    """A flat ``grid``-token picture with a 20-px white square inside one token; the reply boxes that token."""
    cols, rows = grid
    img = Image.new("RGB", (cols * GRID, rows * GRID), tuple(rng.randint(40, 160) for _ in range(3)))
    c, r = rng.randrange(cols), rng.randrange(rows)
    ImageDraw.Draw(img).rectangle((c * GRID + 4, r * GRID + 4, c * GRID + 23, r * GRID + 23), fill=(250, 250, 250))
    box = [c * GRID, r * GRID, (c + 1) * GRID, (r + 1) * GRID]
    return PretrainItem("square", "", [img], "Box the white square.", box_reply(box, "white square"), box=tuple(box))


@dataclass
class PretrainItem:
    """One single-turn conversation: images (in order, shown before the text), user text, the trained reply."""

    task: str
    system: str
    images: list[Image.Image]
    user_text: str
    reply: str
    answer: str = ""  # the letter for read tasks
    box: tuple[int, ...] = ()  # the target box (overview pixels) for locate


def _tight_crop(scene: Scene, rng: random.Random, spec: SceneSpec) -> Image.Image:
    """The tag alone, give or take a few pixels, enlarged like a crop (the easiest close-up to learn from)."""
    x1, y1, x2, y2 = scene.tag_box
    pad = (x2 - x1) // 4
    j = [rng.randint(0, pad) for _ in range(4)]
    W, H = scene.original_size  # noqa: N806
    box = (max(0, x1 - j[0]), max(0, y1 - j[1]), min(W, x2 + j[2]), min(H, y2 + j[3]))
    return crop_and_enlarge(scene.original(), box, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)


def _close_up(scene: Scene, rng: random.Random, spec: SceneSpec) -> Image.Image:
    """A crop around the tag as the rollout would cut it from a box the model drew (jittered grid box)."""
    w, h = scene.overview.size
    cells = rng.choice((2, 2, 3, 3, 4))
    box = grid_box(scene.tag_box_overview(), w, h, cells=cells)
    # shift by up to a cell while still covering the tag
    tb = scene.tag_box_overview()
    for lo_i, hi_i, limit in ((0, 2, w), (1, 3, h)):
        shift = rng.choice((-GRID, 0, 0, GRID))
        lo, hi = box[lo_i] + shift, box[hi_i] + shift
        if lo >= 0 and hi <= limit and lo <= tb[lo_i] and hi >= tb[hi_i]:
            box[lo_i], box[hi_i] = lo, hi
    ori = map_box_to_original(tuple(float(v) for v in box), (w, h), scene.original_size)
    return crop_and_enlarge(scene.original(), ori, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)


def _question_block(rng: random.Random, value: str, spec: SceneSpec) -> tuple[str, str]:
    options = draw_options(rng, spec.kind, value, spec.choices, spec.shuffle_choices)  # as the benchmark draws them
    letter = LETTERS[options.index(value)]
    header = rng.choice(_OPTION_HEADERS)
    block = "\n".join(x for x in (rng.choice(_QUESTIONS), header, format_choices(options).rstrip("\n")) if x)
    return f"{block}\n{rng.choice(_READ_TAILS)}", letter


def make_item(
    task: str,
    scene: Scene | None,
    rng: random.Random,
    spec: SceneSpec,
    *,
    long_system: bool,
    box_cells: int = 3,
    grid: tuple[int, int] = (3, 3),
) -> PretrainItem:
    """One item of ``task`` on ``scene`` (see the module docstring); ``box_cells``: side of a ``spot`` box in
    grid cells; ``grid``: the size in tokens of a ``square`` picture (which ignores ``scene``)."""
    if task == "square":
        return square_item(rng, grid)
    system = system_prompt(rng) if long_system else ""
    if task in ("locate", "spot", "ask"):
        w, h = scene.overview.size
        box = centre_box(scene.tag_box_overview(), w, h, cells=box_cells if task == "spot" else 3)
        if task == "ask":
            text = f"{rng.choice(_QUESTIONS)}\n{rng.choice(_ASK_TAILS)}"
        else:
            text = rng.choice(_LOCATE_REQUESTS)
        return PretrainItem(task, system, [scene.overview], text, box_reply(box), box=tuple(box))
    if task == "direct":
        text = "\n".join(x for x in (rng.choice(_QUESTIONS), rng.choice(_DIRECT_TAILS)) if x)
        return PretrainItem(task, system, [scene.overview], text, scene.value)
    if task == "name":
        crop = _tight_crop(scene, rng, spec) if rng.random() < 0.7 else _close_up(scene, rng, spec)
        return PretrainItem(task, system, [crop], rng.choice(_NAME_REQUESTS), scene.value)
    text, letter = _question_block(rng, scene.value, spec)
    # Name what is seen, then pick the option: the letter is then a copy from the options (a step a tiny LM
    # learns fast) instead of a colour-to-letter mapping it must do in one token.
    reply = f"{scene.value} \\boxed{{{letter}}}"
    guess = f"\\boxed{{{letter}}}"
    if task == "read":
        return PretrainItem(task, system, [_close_up(scene, rng, spec)], text, reply, answer=letter)
    if task == "read2":
        lead = rng.choice(_TWO_IMAGE_LEADS)
        images = [scene.overview, _close_up(scene, rng, spec)]
        return PretrainItem(task, system, images, f"{lead}\n{text}", reply, answer=letter)
    if task == "guess":
        lead = rng.choice(_TWO_IMAGE_LEADS)
        return PretrainItem(task, system, [scene.overview, scene.overview], f"{lead}\n{text}", guess, answer=letter)
    raise ValueError(f"unknown pre-training task {task!r}; use one of {TASKS}")


class ItemEncoder:
    """Token ids, loss mask and image tensors of pre-training items (the chat layout of the episode builder)."""

    def __init__(self, tokenizer: Any, image_processor: Any, special: Any) -> None:
        self.tokenizer, self.image_processor, self.special = tokenizer, image_processor, special
        self._nl = self.text("\n")

    def text(self, s: str) -> list[int]:
        return list(self.tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def encode(self, item: PretrainItem) -> dict[str, Any]:
        import torch

        from mgpo_core.episodes import encode_image

        s = self.special
        ims = [encode_image(self.image_processor, im) for im in item.images]
        ids: list[int] = []
        if item.system:
            ids += [s.im_start, *self.text("system\n"), *self.text(item.system), s.im_end, *self._nl]
        body: list[int] = []
        for im in ims:
            body += [s.vision_start] + [s.image_pad] * im.n_tokens + [s.vision_end]
        body += self.text(item.user_text)
        ids += [s.im_start, *self.text("user\n"), *body, s.im_end, *self._nl, s.im_start, *self.text("assistant\n")]
        prompt_len = len(ids)
        ids += [*self.text(item.reply), s.im_end]
        return {
            "ids": torch.tensor(ids),
            "prompt_len": prompt_len,
            "pixels": torch.cat([im.pixel_values for im in ims]),
            "grid": torch.stack([im.grid_thw for im in ims]),
        }
