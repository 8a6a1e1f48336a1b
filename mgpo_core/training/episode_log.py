"""Watching it learn: every k RL steps, a few sampled episodes as a table and a picture, in the run directory and
in MLflow (what TRL's completion logging and verl's rollout traces give their users, with the grounding drawn).

The picture also goes to MLflow as a stepped image (``log_image(key="episodes", step=...)``), so the run page's
images can be stepped through in training order. The table has one row per episode: turn-1 text, parsed box and its reason code, turn-2 text, the answer read from
the last ``\\boxed{}``, the ground truth, reward and advantage. The picture draws, per episode, the image with the
predicted box (red, in original pixels) and the ground-truth box (green) under a caption.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgpo_core.episodes import Episode
from mgpo_core.evaluation.visualize import PictureItem, draw_eval_grid
from mgpo_core.reward import last_boxed
from mgpo_core.training.metrics import box_in_original

log = logging.getLogger(__name__)


def pick_episodes(episodes: Sequence[Episode], k: int) -> list[int]:
    """Indices of up to ``k`` episodes spread over the groups (first sample of each group first)."""
    seen: dict[int, int] = {}
    rank = []
    for i, ep in enumerate(episodes):
        rank.append((seen.get(ep.group, 0), i))
        seen[ep.group] = seen.get(ep.group, 0) + 1
    return [i for _, i in sorted(rank)[:k]]


def episode_rows(
    episodes: Sequence[Episode], advantages: Sequence[float], step: int, picked: Sequence[int]
) -> list[dict[str, Any]]:
    """The table rows of the ``picked`` episodes (plain JSON types)."""
    rows = []
    for i in picked:
        ep = episodes[i]
        g = ep.grounding
        rows.append(
            {
                "step": step,
                "sample": ep.sample.id,
                "group": ep.group,
                "turn1": ep.turn1_text,
                "box": None if g.box is None else [round(v, 1) for v in g.box],
                "box_reason": g.reason,
                "crop_box": None if ep.crop_box is None else list(ep.crop_box),
                "turn2": ep.turn2_text,
                "answer": last_boxed(ep.turn2_text or ep.turn1_text),
                "ground_truth": ep.sample.answer,
                "reward": float(ep.reward),
                "advantage": float(advantages[i]),
            }
        )
    return rows


def episode_picture(
    episodes: Sequence[Episode], picked: Sequence[int], rows: Sequence[dict[str, Any]], path: Path, step: int
) -> Path:
    items = []
    for i, r in zip(picked, rows, strict=True):
        ep = episodes[i]
        box = box_in_original(ep)
        items.append(
            PictureItem(
                image_path=ep.sample.image_path,
                gt_boxes=tuple(tuple(float(v) for v in b) for b in ep.sample.gt_boxes),  # type: ignore[misc]
                crop_box=box,
                correct=ep.reward > 0.5,
                caption=(
                    f"{ep.sample.id}  {r['answer'] or '-'} / gt {r['ground_truth']}  adv {r['advantage']:+.2f}",
                    f"box: {r['box_reason']} {r['box'] or ''}",
                    (ep.turn1_text or "").replace("\n", " ")[:60],
                ),
            )
        )
    return draw_eval_grid(items, path, columns=4, tile=256, title=f"sampled episodes, RL step {step}")


def log_episodes(
    episodes: Sequence[Episode],
    advantages: Sequence[float],
    step: int,
    *,
    run_dir: str | Path,
    k: int,
    tracking_uri: str | None,
    run_id: str | None,
) -> Path:
    """Write ``episodes/step_<step>.json`` and ``.png`` under ``run_dir`` and log both to the MLflow run.

    The local copy is the durable record; an unreachable tracking server costs a warning, never the step.
    """
    out = Path(run_dir) / "episodes"
    out.mkdir(parents=True, exist_ok=True)
    picked = pick_episodes(episodes, k)
    rows = episode_rows(episodes, advantages, step, picked)
    table = out / f"step_{step:05d}.json"
    tmp = table.with_name(f".{table.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(table)
    picture = episode_picture(episodes, picked, rows, out / f"step_{step:05d}.png", step) if rows else None
    if tracking_uri and run_id:
        try:
            from mlflow.tracking import MlflowClient

            from mgpo_core.ops.tracking import server_reachable

            if server_reachable(tracking_uri):
                client = MlflowClient(tracking_uri)
                columns = {key: [row[key] if not isinstance(row[key], list) else str(row[key]) for row in rows] for key in rows[0]} if rows else {}
                if columns:
                    client.log_table(run_id, data=columns, artifact_file=f"episodes/step_{step:05d}.json")
                if picture is not None:  # the file, and a stepped image the run's Images view steps through
                    from PIL import Image

                    client.log_artifact(run_id, str(picture), artifact_path="episodes")

                    with Image.open(picture) as img:
                        client.log_image(run_id, img.convert("RGB"), key="episodes", step=step)
        except Exception as exc:  # noqa: BLE001 - logging must never end a training run
            log.warning("episode logging to MLflow failed at step %d (%s); the local copy is in %s", step, exc, out)
    return table
