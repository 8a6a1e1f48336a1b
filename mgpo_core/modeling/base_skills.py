"""The tiny base model's skills, measured with the real HF rollout engine on fresh synthetic scenes."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from mgpo_core.modeling.base_recipes import DEFAULT_RECIPE
from mgpo_core.modeling.base_tasks import ItemEncoder, SceneSpec, make_item, make_scene


def _holds(box: Sequence[float], target: Sequence[float]) -> bool:
    return box[0] <= target[0] and box[1] <= target[1] and target[2] <= box[2] and target[3] <= box[3]


def skill_report(
    model_dir: str | Path,
    *,
    scenes: int = 64,
    seed: int = 12345,
    spec: SceneSpec | None = None,
    temperature: float | None = None,
) -> dict[str, float]:
    """Measure the base skills with the real HF rollout engine on fresh scenes (greedy unless ``temperature``).

    - ``locate/valid``: share of locate replies that parse to a valid box (the reference parser);
    - ``locate/contains_target``: share whose box, mapped to the original, holds the whole tag;
    - ``locate/random_box_contains``: the same for a random 3x3-cell box on the grid (the floor to beat);
    - ``ask/*``: the same three for a question about the tag with a request (our wording) to box the area first;
    - ``read/accuracy``: multiple-choice accuracy on a close-up cut from a grid box around the tag (chance 0.25);
    - ``name/accuracy``: colour named from a close-up (chance 1/6).
    """
    from mgpo_core.episodes import PromptTemplates, encode_image
    from mgpo_core.grounding import GroundingOptions, map_box_to_original, parse_grounding_box
    from mgpo_core.modeling.loading import load_bundle
    from mgpo_core.reward import answer_reward
    from mgpo_core.rollout.base import GenerationRequest, RolloutSettings, SamplingSpec
    from mgpo_core.rollout.hf import HFRolloutEngine

    spec = spec or DEFAULT_RECIPE.scene
    bundle = load_bundle(model_dir)
    templates = PromptTemplates("", "{question}", "{question}{choices}", "{question}{choices}")
    engine = HFRolloutEngine(
        bundle.model, bundle.tokenizer, bundle.image_processor, bundle.special, templates, RolloutSettings(), batch_size=32
    )
    encoder = ItemEncoder(bundle.tokenizer, bundle.image_processor, bundle.special)
    rng = random.Random(f"mgpo-base-skills:{seed}")
    pool = [make_scene(f"mgpo-base-skills:{seed}:{i}", spec) for i in range(scenes)]
    sampling = SamplingSpec(64, temperature or 1.0, 1.0, greedy=temperature is None, seed=seed)
    report: dict[str, float] = {}
    for task in ("locate", "ask", "read", "name"):
        items = [make_item(task, sc, rng, spec, long_system=True) for sc in pool]
        reqs = []
        for it in items:
            e = encoder.encode(it)
            ids = e["ids"][: e["prompt_len"]].tolist()
            ims = [encode_image(bundle.image_processor, im) for im in it.images]
            reqs.append(GenerationRequest(ids, ims, list(it.images), 64))
        outs = engine._generate(reqs, sampling, 1)
        texts = [bundle.tokenizer.decode(o[0].token_ids, skip_special_tokens=True) for o in outs]
        if task in ("locate", "ask"):
            valid = contains = rand = 0
            for sc, text in zip(pool, texts, strict=True):
                w, h = sc.overview.size
                g = parse_grounding_box(text, w, h, GroundingOptions())
                if g.valid and g.box is not None:
                    valid += 1
                    contains += _holds(map_box_to_original(g.box, (w, h), sc.original_size), sc.tag_box)
                gx, gy = rng.randrange(0, w // 28 - 2) * 28, rng.randrange(0, h // 28 - 2) * 28
                rand += _holds(map_box_to_original((gx, gy, gx + 84, gy + 84), (w, h), sc.original_size), sc.tag_box)
            report.update(
                {f"{task}/valid": valid / scenes, f"{task}/contains_target": contains / scenes,
                 f"{task}/random_box_contains": rand / scenes}
            )
        elif task == "read":
            report["read/accuracy"] = sum(answer_reward([t], it.answer) for t, it in zip(texts, items, strict=True)) / scenes
        else:
            report["name/accuracy"] = sum(t.strip() == it.reply for t, it in zip(texts, items, strict=True)) / scenes
    return report
