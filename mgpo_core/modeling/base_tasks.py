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
- ``locate``: the overview (resized exactly as the rollout resizes it) + a request to box the small white tag ->
  a fenced ``bbox_2d`` JSON list, coordinates snapped to the 28-px token grid;
- ``read2``: the overview and a close-up as two images + a question with options -> ``red \\boxed{C}`` (the
  model learns to read the answer off the second picture when it shows the tag);
- ``guess``: the overview twice (no close-up) + a question with options -> the right letter, which cannot be seen:
  the model learns that without a close-up it can only guess.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image

from mgpo_core.data.schema import LETTERS, format_choices
from mgpo_core.data.synthetic import VOCABULARY, make_synthetic_image
from mgpo_core.grounding import map_box_to_original
from mgpo_core.imaging import crop_and_enlarge, resize_for_model

GRID = 28
"""Qwen2.5-VL's merged-patch size: one visual token per 28x28 pixels of the image the model sees."""

TASKS = ("name", "read", "locate", "read2", "guess")

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


def make_scene(seed: str, spec: SceneSpec, mark_fraction: float | None = None) -> Scene:
    """One picture drawn from ``seed``; ``mark_fraction`` overrides the spec's (the curriculum starts big)."""
    rng = random.Random(seed)
    mark = spec.mark_fraction if mark_fraction is None else mark_fraction
    img, target = make_synthetic_image(
        rng,
        spec.width,
        spec.height,
        kind=spec.kind,
        overview_max_pixels=spec.max_pixels,
        min_target_px=spec.min_target_px,
        mark_fraction=mark,
        decoys=spec.decoys,
    )
    overview = resize_for_model(img, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, subsampling=0)
    return Scene(overview, buf.getvalue(), img.size, tuple(target["box"]), target["value"], mark)


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


def _options(rng: random.Random, value: str, n: int = 4) -> tuple[list[str], str]:
    vocab = VOCABULARY["colour"]
    options = [value, *rng.sample([v for v in vocab if v != value], n - 1)]
    rng.shuffle(options)
    return options, LETTERS[options.index(value)]


def _question_block(rng: random.Random, value: str) -> tuple[str, str]:
    options, letter = _options(rng, value)
    header = rng.choice(_OPTION_HEADERS)
    block = "\n".join(x for x in (rng.choice(_QUESTIONS), header, format_choices(options).rstrip("\n")) if x)
    return f"{block}\n{rng.choice(_READ_TAILS)}", letter


def make_item(task: str, scene: Scene, rng: random.Random, spec: SceneSpec, *, long_system: bool) -> PretrainItem:
    """One item of ``task`` on ``scene`` (see the module docstring)."""
    system = system_prompt(rng) if long_system else ""
    if task == "locate":
        w, h = scene.overview.size
        box = grid_box(scene.tag_box_overview(), w, h)
        return PretrainItem(task, system, [scene.overview], rng.choice(_LOCATE_REQUESTS), box_reply(box), box=tuple(box))
    if task == "name":
        crop = _tight_crop(scene, rng, spec) if rng.random() < 0.7 else _close_up(scene, rng, spec)
        return PretrainItem(task, system, [crop], rng.choice(_NAME_REQUESTS), scene.value)
    text, letter = _question_block(rng, scene.value)
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
