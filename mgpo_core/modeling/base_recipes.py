"""The tiny base model's pre-training recipes: stages (tasks, mix, steps, learning rates) and the named recipes,
each with a digest that keys the cache and the shipped copy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mgpo_core.modeling.base_tasks import SceneSpec


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: ``steps`` optimiser steps on a task mix (weights by task name)."""

    name: str
    steps: int
    mix: dict[str, float]
    long_system: bool = False
    lr: float = 1e-3
    restart: bool = False
    """Start the stage with a fresh optimiser and its own item stream (seeded by seed and stage index), so a
    build resumed here from the previous stage's snapshot is exactly the one-go build."""
    decay: bool = False
    """Cosine-decay the learning rate to 10 % over the stage (else constant after warmup: the position
    circuit forms abruptly after a plateau, and a decayed rate can miss it)."""
    marks: tuple[float, ...] = (0.25,)
    """Mark sizes (share of the tag's side) the stage's pictures have: reading starts on big marks."""
    grids: tuple[int, int, int, int] = (3, 3, 9, 7)
    """``spot`` scenes' size in visual tokens: (min columns, min rows, max columns, max rows)."""
    plain: float = 0.0
    """Share of ``spot`` scenes that show the tag alone on a flat background (no clutter, no decoys)."""
    box_cells: int = 3
    """Side of a ``spot`` answer box in grid cells (``locate`` boxes are always 3x3 cells)."""
    aligned: bool = False
    """Plain ``spot`` scenes put the tag at the centre of one visual token (the first, sharpest pictures)."""
    vision_lr: float | None = None
    """The vision tower's and merger's learning rate (None: ``lr``). Colours learnt on top of the position
    circuit need the vision side to move faster than the language model, whose slower rate keeps the circuit."""
    item_mean: bool = False
    """Average the loss per item, then over the batch (off: over all reply tokens, so a 44-token box reply
    outweighs a 2-token colour word 20 to 1 and the colour items barely train)."""


    keep_vision: float = 0.0
    """Weight of a loss that keeps the vision side's output on the batch's whole-scene pictures (its ``square``,
    ``spot``, ``locate`` and ``ask`` items) what it was at the stage's start (squared error relative to the
    features' mean square): the position circuit reads those features, so colours learnt on close-ups must not
    move them (docs/REPRODUCTION.md, session 6)."""


_ADDED_LATER = {"vision_lr": None, "item_mean": False, "keep_vision": 0.0}
"""Stage fields added after the shipped grounding build: in a recipe's digest only when set away from these
defaults, so adding a field does not change the digest of recipes that do not use it."""

_SCENE_TASKS = ("square", "spot", "locate", "ask")
"""Tasks whose one picture is a whole scene (``keep_vision`` holds the vision side's output on them)."""


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the base model besides the seed (hashed into the cache key).

    With a ``parent`` the build starts from the parent recipe's model for the same seed (the shipped one, or
    built first), rounded to bfloat16 as a shipped model is, and runs only its own ``stages`` on top; the
    parent's recipe is part of this one's digest.
    """

    scene: SceneSpec = field(default_factory=SceneSpec)
    stages: tuple[Stage, ...] = (
        # Where things are, in the order a tiny model can learn it (docs/REPRODUCTION.md): a white square on
        # pictures of 2x2..5x5 tokens (one-token boxes), then the tag on flat pictures, then cluttered ones,
        # then the full scene. Straight on the full 9x7-token overview it only ever learns the boxes' prior.
        Stage("square", 150, {"square": 1.0}, grids=(2, 2, 3, 3)),
        Stage("square-mid", 100, {"square": 1.0}, grids=(3, 3, 5, 5)),
        Stage("spot-plain", 200, {"spot": 1.0}, grids=(4, 4, 7, 7), plain=1.0),
        Stage("spot", 150, {"spot": 1.0}, grids=(4, 3, 9, 7), plain=0.3),
        Stage("locate", 200, {"spot": 0.3, "locate": 0.7}, grids=(4, 3, 9, 7)),
        # what things are: colours from close-ups, big marks first
        # (at 1e-3 the close-ups wiped the position circuit out within 50 steps: a lower rate from here on)
        Stage("colour", 60, {"name": 0.6, "locate": 0.4}, marks=(0.7, 0.5), lr=4e-4, restart=True),
        Stage("name", 80, {"name": 0.6, "locate": 0.4}, marks=(0.5, 0.35, 0.25), lr=4e-4),
        Stage("read", 100, {"name": 0.2, "read": 0.4, "locate": 0.4}, marks=(0.35, 0.25), lr=4e-4),
        Stage(
            "mixed", 160, {"name": 0.1, "read": 0.3, "locate": 0.35, "read2": 0.25}, long_system=True,
            marks=(0.25,), lr=4e-4, decay=True,
        ),
    )
    batch_size: int = 32
    scenes: int = 1600
    mark_levels: tuple[float, ...] = (0.7, 0.5, 0.35, 0.25)
    """Mark sizes the scene pool is drawn with (an equal share each); stages pick among them."""
    weight_decay: float = 0.01
    warmup_steps: int = 10
    text_hidden: int = 256
    text_layers: int = 4
    vision_hidden: int = 128
    vision_depth: int = 4
    rope_theta: float = 10.0
    mrope_section: tuple[int, int, int] = (4, 14, 14)
    name: str = "base"
    """Names the shipped copy (``weights/tiny-<name>-seed<seed>``) and the cache folder."""
    parent: BaseRecipe | None = None

    def digest(self) -> str:
        blob = json.dumps(_digest_view(asdict(self)), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def architecture(self) -> tuple:
        return (self.text_hidden, self.text_layers, self.vision_hidden, self.vision_depth, self.rope_theta,
                tuple(self.mrope_section))

    def items_seed(self, seed: int, stage: int | None = None) -> str:
        """The item stream's seed string (a child recipe's differs from its parent's)."""
        own = "" if self.parent is None else f":{self.name}"
        return f"mgpo-base-items:{seed}{own}" + ("" if stage is None else f":stage{stage}")


_SCENE_ADDED_LATER = {"geometry": "fixed"}
"""SceneSpec fields added after shipped builds: in a digest only when set away from these defaults."""


def _digest_view(recipe: dict[str, Any]) -> dict[str, Any]:
    stages = [{k: v for k, v in st.items() if k not in _ADDED_LATER or v != _ADDED_LATER[k]} for st in recipe["stages"]]
    scene = {k: v for k, v in recipe["scene"].items() if k not in _SCENE_ADDED_LATER or v != _SCENE_ADDED_LATER[k]}
    parent = recipe["parent"] and _digest_view(recipe["parent"])
    return {**recipe, "scene": scene, "stages": stages, "parent": parent}


GROUNDING_RECIPE = BaseRecipe(name="ground")
"""The position-first build (shipped as ``weights/tiny-ground-seed0``): it grounds (locate boxes hold the tag
0.91 vs 0.09 for a random box) but reads at chance; its colour stages did not learn (docs/REPRODUCTION.md)."""

_COLOUR = {"lr": 4e-4, "vision_lr": 1e-3, "item_mean": True, "keep_vision": 1.0}

READING_RECIPE = BaseRecipe(
    name="base",
    parent=GROUNDING_RECIPE,
    scene=SceneSpec(choices=6, shuffle_choices=False),
    scenes=800,
    stages=(
        # Colours on top of the position circuit (docs/REPRODUCTION.md, sessions 5-6): losses averaged per item
        # (else the box replies' tokens drown the colour words), the vision side at 2.5x the language model's
        # rate, and its output on whole scenes held where it was (keep_vision: the circuit reads those features;
        # without it the colour's onset erased the circuit), the biggest marks alone first.
        Stage("colour-big", 200, {"name": 0.6, "locate": 0.4}, marks=(0.7,), restart=True, **_COLOUR),
        Stage("colour-mid", 150, {"name": 0.6, "locate": 0.4}, marks=(0.7, 0.5), **_COLOUR),
        Stage("colour-small", 150, {"name": 0.5, "read": 0.1, "locate": 0.4}, marks=(0.5, 0.35, 0.25), restart=True,
              **_COLOUR),
        Stage("read", 100, {"name": 0.3, "read": 0.3, "locate": 0.4}, marks=(0.35, 0.25), **_COLOUR),
        # the formats MGPO's turns meet: two pictures (turn 2), long system prompts, a request to box first
        Stage(
            "mixed", 150, {"read": 0.25, "name": 0.1, "locate": 0.3, "ask": 0.1, "read2": 0.25},
            marks=(0.35, 0.25), long_system=True, decay=True, restart=True, **_COLOUR,
        ),
    ),
)
"""The base MGPO starts from (shipped as ``weights/tiny-base-seed0``): the grounding build, then colours and
reading on top (fixed-order options: a colour keeps its letter), then the formats MGPO's turns meet."""

_COLD_ASK, _COLD_DIRECT = 0.1, 0.02
_COLD_REST = 1.0 - _COLD_ASK - _COLD_DIRECT

COLD_RECIPE = BaseRecipe(
    name="cold",
    parent=READING_RECIPE,
    scene=SceneSpec(choices=6, shuffle_choices=False),
    scenes=400,
    stages=(
        # A bare question now usually gets a direct (guessed) answer, as a real VLM gives one, so a question
        # without options no longer always means "box first": MGPO's request meets a model that boxes only
        # sometimes (docs/REPRODUCTION.md, the cold start).
        Stage(
            "cold", 100,
            {"read": 0.3 * _COLD_REST, "name": 0.1 * _COLD_REST, "locate": 0.3 * _COLD_REST, "read2": 0.3 * _COLD_REST,
             "ask": _COLD_ASK, "direct": _COLD_DIRECT},
            marks=(0.35, 0.25), long_system=True, decay=True, restart=True, **_COLOUR,
        ),
    ),
)
"""The reading base, then a short stage with bare questions answered directly: the cold start of the paper's
base model in miniature (shipped as ``weights/tiny-cold-seed0``)."""

_GEO_SPOT = 0.15
_GEO_REST = 1.0 - _COLD_ASK - _COLD_DIRECT - _GEO_SPOT

GEOMETRY_RECIPE = BaseRecipe(
    name="geo",
    parent=COLD_RECIPE,
    scene=SceneSpec(choices=6, shuffle_choices=False, geometry="varied"),
    scenes=600,
    stages=(
        # Until now every overview the base saw was at most 9x7 visual tokens (the 1024x768 scene), so its boxes
        # were partly a memorised layout (issue 29): on 16:9 or 9:16 pictures (11x6, 6x11 tokens) it wrote rows
        # and columns that are not there. One stage: the cold stage's mix on scenes of every trained aspect ratio
        # and size, with `spot` items on pictures of 4-11 tokens per side (where a box depends on where the tag
        # is) in place of part of the reading. The shares of `ask` and `direct` are the cold stage's, so the cold
        # start stays. (Run as two stages, `spot`/`locate` first, then the cold mix, the base never boxed under
        # MGPO's template: 0.02 of sampled turns, and 20 RL steps found no box to reward; docs/REPRODUCTION.md.)
        Stage(
            "geometry", 250,
            {"read": 0.3 * _GEO_REST, "name": 0.1 * _GEO_REST, "locate": 0.3 * _GEO_REST,
             "read2": 0.3 * _GEO_REST, "ask": _COLD_ASK, "direct": _COLD_DIRECT, "spot": _GEO_SPOT},
            grids=(4, 3, 11, 11), plain=0.2, marks=(0.35, 0.25), long_system=True, decay=True, restart=True,
            **_COLOUR,
        ),
    ),
)
"""The cold base, then the same mix on scenes of varied aspect ratio and size (``data.synthetic_geometry:
varied``): the default base (shipped as ``weights/tiny-geo-seed0``)."""

DEFAULT_RECIPE = GEOMETRY_RECIPE
"""The base MGPO starts from (``model.tiny: base``)."""
