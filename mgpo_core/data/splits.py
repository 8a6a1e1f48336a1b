"""The training and evaluation splits a config names: ``data.<split>_path`` or the synthetic split it generates."""

from __future__ import annotations

from pathlib import Path

from mgpo_core.config import MGPOConfig
from mgpo_core.data.schema import Sample


def _load_split(cfg: MGPOConfig, split: str) -> list[Sample]:
    """``data.<split>_path`` (a dataset directory with samples.jsonl, or a JSONL file) or the synthetic split."""
    from mgpo_core.data.synthetic import read_samples_jsonl, synthetic_split_for

    given = cfg.data.train_path if split == "train" else cfg.data.eval_path
    if given:
        path = Path(given)
        if path.is_dir():
            path = path / "samples.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"data.{split}_path: {path} does not exist; run `mgpo data filter` first")
        return read_samples_jsonl(path)
    return read_samples_jsonl(synthetic_split_for(cfg, split))


def load_training_samples(cfg: MGPOConfig) -> list[Sample]:
    """The training split: ``data.train_path`` or the synthetic train split."""
    return _load_split(cfg, "train")


def load_eval_samples(cfg: MGPOConfig) -> list[Sample]:
    """The evaluation split: ``data.eval_path`` or the synthetic eval split (validation during training)."""
    return _load_split(cfg, "eval")
