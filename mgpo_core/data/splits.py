"""The training and evaluation splits a config names: ``data.<split>_path`` or the synthetic split it generates.

A split is read with its image paths contained (docs/SECURITY.md): ``data.<split>_path`` may be a hand-written
JSONL whose rows name any file, and the trainer opens every image it is given. A row whose image resolves
(symlinks followed) outside the split's roots is dropped with the reason ``path_outside_root``; the drops are
counted in the log, and a split with nothing left is an error naming the fix.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from mgpo_core.config import MGPOConfig
from mgpo_core.data.rows import RowError, contained
from mgpo_core.data.schema import Sample

log = logging.getLogger(__name__)


def _manifest_roots(dataset_dir: Path) -> list[Path]:
    """The folders the filter stage read a dataset's images from, as its manifest records them (the inputs'
    folders, ``data.root``, ``data.image_root``); empty without a readable manifest."""
    try:
        manifest = json.loads((dataset_dir / "manifest.json").read_text())
        data = manifest.get("config", {}).get("data", {})
        found = [Path(i["path"]) for i in manifest.get("inputs", [])]
        found = [p if p.is_dir() else p.parent for p in found]
        found += [Path(data[k]) for k in ("root", "image_root") if data.get(k)]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []
    return found


def split_roots(cfg: MGPOConfig, path: Path) -> list[Path]:
    """Where a split's images may lie: ``data.root`` when set, else the split's own folder; always the state
    folder (generated splits, the embedded-image cache).

    A dataset the filter stage wrote inside the state folder also allows the folders its manifest names (the
    filter already checked its rows against them). A folder outside the state folder gets no such trust: its
    manifest is as hand-written as its rows.
    """
    state = Path(cfg.state_dir).resolve()
    folder = path.parent.resolve()
    roots = [Path(cfg.data.root).resolve() if cfg.data.root else folder, state]
    if not cfg.data.root and folder.is_relative_to(state):
        roots += [p.resolve() for p in _manifest_roots(folder)]
    return roots


def read_contained(path: Path, roots: list[Path], field: str) -> list[Sample]:
    """The samples of a JSONL split whose images lie inside ``roots``; the others are dropped and counted.

    Raises ``ValueError`` when every row was dropped (training on nothing would hide the cause).
    """
    from mgpo_core.data.synthetic import read_samples_jsonl

    samples = read_samples_jsonl(path)
    kept: list[Sample] = []
    reasons: Counter[str] = Counter()
    first: str | None = None
    for s in samples:
        try:
            contained(Path(s.image_path), roots, name=f"{s.id} image_path")
        except RowError as e:
            reasons[e.reason] += 1
            first = first or e.detail
            continue
        kept.append(s)
    if reasons:
        counts = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items()))
        log.warning("%s %s: %d of %d rows dropped (%s); first: %s", field, path, sum(reasons.values()),
                    len(samples), counts, first)  # fmt: skip
    if samples and not kept:
        raise ValueError(
            f"{field} {path}: every row was dropped ({counts}); first: {first}"
        )  # the detail names the fix (move the images under a root, or set data.root)
    return kept


def _load_split(cfg: MGPOConfig, split: str) -> list[Sample]:
    """``data.<split>_path`` (a dataset directory with samples.jsonl, or a JSONL file) or the synthetic split."""
    from mgpo_core.data.synthetic import synthetic_split_for

    given = cfg.data.train_path if split == "train" else cfg.data.eval_path
    if given:
        path = Path(given)
        if path.is_dir():
            path = path / "samples.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"data.{split}_path: {path} does not exist; run `mgpo data filter` first")
    else:
        path = synthetic_split_for(cfg, split)
    return read_contained(path, split_roots(cfg, path), f"data.{split}_path")


def load_training_samples(cfg: MGPOConfig) -> list[Sample]:
    """The training split: ``data.train_path`` or the synthetic train split."""
    return _load_split(cfg, "train")


def load_eval_samples(cfg: MGPOConfig) -> list[Sample]:
    """The evaluation split: ``data.eval_path`` or the synthetic eval split (validation during training)."""
    return _load_split(cfg, "eval")


def validation_sets(cfg: MGPOConfig) -> dict[str, list[Sample]]:
    """What the trainer validates on, by metric prefix: ``val`` (the first ``evaluation.during_training_limit``
    questions of the evaluation split) and, with ``evaluation.during_training_heldout``, ``val_heldout``: as many
    questions of the synthetic evaluation split drawn from the held-out geometry band (``data.synthetic_geometry:
    heldout``), which no training image comes from."""
    from mgpo_core.data.synthetic import synthetic_split_for

    limit = cfg.evaluation.during_training_limit
    sets = {"val": load_eval_samples(cfg)[:limit]}
    if cfg.evaluation.during_training_heldout:
        held = cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic_geometry": "heldout"})})
        path = synthetic_split_for(held, "eval")
        sets["val_heldout"] = read_contained(path, split_roots(held, path), "evaluation.during_training_heldout")[:limit]
    return sets

