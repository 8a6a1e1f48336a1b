"""A registered policy that really answers, for the registry and serving tests: the shipped tiny base model that
boxes and reads (recipe ``base``) with the default preset's prompts, as an export carries them, and the default
preset's labelled synthetic questions at the one image size it learnt (1024x768), which it answers with letters
well above chance (1 in 6)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

QUESTIONS = 6


def answering_model(root: Path) -> tuple[Path, list]:
    """(checkpoint dir, labelled samples) under ``root``: the reading base model as an export (with
    ``mgpo_config.yaml``) and the default preset's first labelled synthetic questions."""
    import yaml

    from mgpo_core.config import load_config
    from mgpo_core.data.synthetic import read_samples_jsonl, synthetic_split_for
    from mgpo_core.modeling.base import shipped_base_dir
    from mgpo_core.modeling.base_recipes import READING_RECIPE

    # the reading base learnt on 1024x768 scenes only: its questions are drawn at that one size (the default
    # preset's varied geometry is the varied-geometry base's, which rarely boxes under MGPO's template)
    cfg = load_config("tiny-base-cpu", [f"state_dir={root / 'state'}", "data.synthetic_geometry=fixed"])
    model = root / "export"
    shipped = shipped_base_dir(0, READING_RECIPE)
    assert shipped is not None, "the shipped reading base model (mgpo_core/modeling/weights/tiny-base-seed0) is missing"
    shutil.copytree(shipped, model)
    prompts = {k: cfg.model_dump(mode="json")[k] for k in ("rollout", "grounding")}
    (model / "mgpo_config.yaml").write_text(yaml.safe_dump(prompts, sort_keys=True))
    return model, read_samples_jsonl(synthetic_split_for(cfg, "eval"))[:QUESTIONS]


def row(sample, *, encode: bool) -> dict:  # noqa: ANN001
    data = Path(sample.image_path).read_bytes()
    image = base64.b64encode(data).decode() if encode else data
    return {"image": image, "question": sample.question, "choices": list(sample.choices)}


def library_answers(model_dir: Path, samples) -> list[str | None]:  # noqa: ANN001
    """The same greedy two-turn inference run straight through the library, for comparison."""
    from mgpo_core.config import load_config
    from mgpo_core.modeling.loading import load_bundle
    from mgpo_core.reward import last_boxed, normalize_choice
    from mgpo_core.rollout.hf import HFRolloutEngine

    engine = HFRolloutEngine.for_bundle(load_bundle(model_dir), load_config(model_dir / "mgpo_config.yaml"))
    episodes = engine.generate_episodes(samples, n=1, greedy=True)
    return [normalize_choice(last_boxed(ep.turn2_text) or "") for ep in episodes]


def check_letters(answers, samples) -> None:  # noqa: ANN001
    """Every answer is one of the question's letters, and the model is right well above chance (1/6 each)."""
    assert len(answers) == len(samples)
    letters = [a for a in answers if a is not None]
    assert len(letters) >= len(samples) - 1, answers
    for a, s in zip(answers, samples, strict=True):
        assert a is None or a in "ABCDEFGH"[: len(s.choices)], (a, s.choices)
    correct = sum(a == s.answer for a, s in zip(answers, samples, strict=True))
    assert correct >= len(samples) // 2, (answers, [s.answer for s in samples])
