"""Atomic, complete, resumable checkpoints (DeepSpeed engine state + RNG of every rank + data position + step).

Layout under ``<run_dir>/checkpoints``: ``step-000010/`` (complete checkpoints only), ``latest`` (a one-line file
naming the newest complete one, replaced atomically), ``.tmp-step-000010/`` (a checkpoint being written; never
read, removed on the next start). Every rank writes into the temp directory, a barrier, then rank 0 renames it
into place and only then updates ``latest`` — a process killed at any point leaves the previous checkpoint valid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step-{step:06d}"


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers only, so that it loads with
    ``torch.load(weights_only=True)``: a checkpoint on shared storage must not be able to run code when read."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


POINT_HOOKS: list[Any] = []
"""Callables ``hook(name, step)`` run at each named point of a step and a checkpoint. Production registers none
and reads no environment here; the crash tests add theirs from tests/fault_hooks/ (see its sitecustomize.py)."""


def fault_point(name: str, step: int) -> None:
    """A named point (``rollout``, ``step-done``, ``checkpoint-written``/``-renamed``/``-done``) where the tests'
    crash hooks may act; a no-op unless a test registered a hook in ``POINT_HOOKS``."""
    for hook in POINT_HOOKS:
        hook(name, step)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest COMPLETE checkpoint directory, or None."""
    root = Path(ckpt_root)
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def clean_partial(ckpt_root: str | Path) -> None:
    """Remove temp directories left by a crash mid-write (rank 0, at start-up)."""
    root = Path(ckpt_root)
    if root.exists():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    engine,
    ckpt_root: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    *,
    rank: int,
    keep_last: int,
    keep_every: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically (all ranks call this); returns its final path."""
    root = Path(ckpt_root)
    tag = step_tag(step)
    tmp_tag = f".tmp-{tag}"
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"mgpo_step": step}, save_latest=False)
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{rank:03d}.pt")
    _barrier()
    fault_point("checkpoint-written", step)
    if rank == 0:
        # The trainer state is the completeness marker: written last, inside the temp dir, before the rename.
        _atomic_write_text(root / tmp_tag / "trainer_state.json", json.dumps(trainer_state, indent=1))
        if final.exists():  # a previous attempt of the same step completed: replace it
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        fault_point("checkpoint-renamed", step)
        _atomic_write_text(root / LATEST, tag + "\n")
        prune(root, keep_last, keep_every)
    _barrier()
    fault_point("checkpoint-done", step)
    return final


def prune(root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (never the one ``latest`` names), and every checkpoint
    whose step is a multiple of ``keep_every`` (> 0: candidates of checkpoint selection)."""
    current = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in steps[: max(0, len(steps) - keep_last)]:
        if keep_every and int(p.name.split("-")[1]) % keep_every == 0:
            continue
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def read_rng_state(rng_file: Path) -> dict[str, Any]:
    """A rank's saved RNG state, read with ``weights_only=True`` (tensors and plain values; a pickle is refused)."""
    try:
        return torch.load(rng_file, weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unpickling refusal has several exception types
        raise RuntimeError(
            f"{rng_file} cannot be read as plain tensors ({type(err).__name__}): it was written by an older "
            "version (a pickle, refused since it could run code) or altered; start a new run directory or "
            "delete this checkpoint"
        ) from None


def load_checkpoint(engine, path: Path, *, rank: int) -> dict[str, Any]:
    """Restore engine (model, optimizer, scheduler), this rank's RNG, and return the trainer state."""
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rng_file = path / f"rng_rank{rank:03d}.pt"
    if not rng_file.exists():
        raise RuntimeError(
            f"{rng_file} is missing: the checkpoint was written by a different number of ranks; "
            "resume with the same world size"
        )
    set_rng_state(read_rng_state(rng_file))
    return json.loads((path / "trainer_state.json").read_text())


def export_hf(model, tokenizer_dir: str | Path, out_dir: str | Path, *, state_dict=None) -> Path:  # noqa: ANN001
    """Write the policy as a Hugging Face directory (safetensors + config + tokenizer/processor files), atomically."""
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    src = Path(tokenizer_dir)
    for f in src.iterdir():
        # The base's weights and their index describe the BASE's shards: an index copied beside an export
        # written as other files (transformers writes <= 50 GB shards, so a 7B export is one file) names shards
        # that are not there, and vLLM refuses the directory. Only the export's own index may be in it.
        if f.is_file() and not _is_weight_file(f.name) and f.name not in ("config.json",):
            if not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    check_weight_index(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _is_weight_file(name: str) -> bool:
    """Weights or a weight index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``)."""
    return name.endswith((".safetensors", ".bin", ".pt", ".safetensors.index.json", ".bin.index.json"))


def check_weight_index(model_dir: str | Path) -> None:
    """Raise if ``model_dir``'s weight index names a shard that is not there (what vLLM refuses to load)."""
    d = Path(model_dir)
    for index in d.glob("*.index.json"):
        names = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(n for n in names if not (d / n).is_file())
        if missing:
            raise RuntimeError(
                f"{index} names weight files that are not in {d}: {missing[:3]}; the directory would not load "
                "in vLLM or transformers. Delete the stale index or restore the shards"
            )
