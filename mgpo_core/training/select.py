"""Checkpoint selection after training: evaluate every k-th saved checkpoint, keep the best.

RL validation accuracy peaks and can then decay, so the last checkpoint is not necessarily the one to register.
With ``checkpoint.select_every = k`` the trainer keeps every k-th checkpoint (beside the newest ``keep_last``),
and after training each of them (plus the last) is exported as a Hugging Face directory and evaluated greedily
on the configured benchmarks (``evaluation.benchmarks``, ``evaluation.limit``, ``evaluation.mode``). The
promotion metric of each is logged to the training run as ``select/<metric>`` at its step (the curve), the best
one is returned (ties: the later step) and becomes what the pipeline registers, with its step in the lineage.
Runs outside the trainer's step loop, in the process that launched training.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgpo_core.config import MGPOConfig
from mgpo_core.training import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass
class Selection:
    best_step: int
    best_dir: Path
    metric: str
    curve: dict[int, float] = field(default_factory=dict)


def candidate_checkpoints(ckpt_root: Path, every: int) -> list[tuple[int, Path]]:
    """Complete checkpoints whose step is a multiple of ``every``, plus the newest one."""
    found = []
    for p in sorted(ckpt_root.glob("step-*")):
        if p.is_dir() and (p / "trainer_state.json").exists():
            found.append((int(p.name.split("-")[1]), p))
    if not found:
        return []
    last = found[-1]
    return [(s, p) for s, p in found if s % every == 0 or (s, p) == last]


def checkpoint_state_dict(path: Path) -> dict[str, Any]:
    """Full fp32 weights of a DeepSpeed checkpoint directory (any ZeRO stage; stage 0 reads the module file)."""
    import torch

    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except (FileNotFoundError, ValueError, KeyError) as e:
        files = sorted(path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise RuntimeError(f"{path} holds no DeepSpeed model states ({e})") from e
        # weights_only: tensors and plain containers only, never a pickle that could run code (shared storage).
        return torch.load(files[0], map_location="cpu", weights_only=True)["module"]


def export_checkpoint(base_dir: Path, path: Path, out: Path, prompts_from: Path | None) -> Path:
    """``path`` (a DeepSpeed checkpoint) as an HF directory at ``out`` (reused when already complete)."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from mgpo_core.modeling.loading import load_model

    model = load_model(base_dir, dtype="float32")
    missing, unexpected = model.load_state_dict(checkpoint_state_dict(path), strict=False)
    params = {n for n, _ in model.named_parameters()}
    if unexpected or (set(missing) & params):
        raise RuntimeError(
            f"checkpoint {path} does not fit the model in {base_dir}: missing {sorted(set(missing) & params)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    ckpt.export_hf(model, base_dir, out)
    if prompts_from is not None and (prompts_from / "mgpo_config.yaml").is_file():
        shutil.copy2(prompts_from / "mgpo_config.yaml", out / "mgpo_config.yaml")
    return out


def select_checkpoint(
    cfg: MGPOConfig,
    run_dir: Path,
    final_export: Path,
    *,
    base_dir: Path,
    evaluate_dir: Callable[[Path, Path], dict[str, float]],
    log_point: Callable[[str, float, int], None] | None = None,
) -> Selection:
    """Evaluate the candidates with ``evaluate_dir(hf_dir, out_dir) -> prefixed metrics``; return the best.

    The newest checkpoint is the final export itself (no conversion). ``log_point(key, value, step)`` receives
    the curve (the pipeline logs it to the training run). ``<run_dir>/selection.json`` records the outcome.
    """
    every = cfg.checkpoint.select_every
    metric = cfg.checkpoint.selection_metric(cfg.evaluation.promotion_metric)
    cands = candidate_checkpoints(run_dir / "checkpoints", every)
    if not cands:
        raise RuntimeError(f"checkpoint selection: no complete checkpoint in {run_dir / 'checkpoints'}")
    curve: dict[int, float] = {}
    dirs: dict[int, Path] = {}
    for i, (step, path) in enumerate(cands):
        last = i == len(cands) - 1
        hf = final_export if last else export_checkpoint(
            base_dir, path, run_dir / "selection" / path.name, final_export
        )
        metrics = evaluate_dir(hf, run_dir / "selection" / f"eval-{path.name}")
        if metric not in metrics:
            raise RuntimeError(
                f"checkpoint selection: the evaluation gave no {metric!r} (checkpoint.select_on, else "
                f"evaluation.promotion_metric); it gave {sorted(metrics)[:8]} - set it to one of the evaluated "
                "benchmarks'"
            )
        curve[step], dirs[step] = float(metrics[metric]), hf
        log.info("checkpoint selection: step %d %s = %.4f", step, metric, curve[step])
        if log_point is not None:
            log_point(f"select/{metric}", curve[step], step)
    best = max(curve, key=lambda s: (curve[s], s))
    sel = Selection(best, dirs[best], metric, curve)
    (run_dir / "selection.json").write_text(
        json.dumps({"metric": metric, "best_step": best, "best_dir": str(dirs[best]),
                    "curve": {str(k): v for k, v in curve.items()}}, indent=1) + "\n"
    )  # fmt: skip
    return sel
