"""Training entrypoint for ``python -m mgpo_core.training.entry`` (one process) or a ``deepspeed``/``torchrun``
process group: ``--config <yaml> --run-dir <dir> [--mlflow-run-id ID]``. Writes ``<run-dir>/manifest.json``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mgpo_core.config import load_config
from mgpo_core.data.splits import load_training_samples
from mgpo_core.modeling.source import model_dir_for


def line_atomic_output() -> None:
    """Make every line of this rank reach the shared pipe in ONE write.

    Ranks share the launcher's stdout pipe; unbuffered (``PYTHONUNBUFFERED``) ``print`` writes the text and the
    newline separately, so two ranks' lines could merge into one. Line buffering over the text layer sends each
    whole line in one write, and a pipe never splits writes up to 4 KiB.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):  # pragma: no cover - replaced streams
            pass


def main(argv: list[str] | None = None) -> int:
    line_atomic_output()
    p = argparse.ArgumentParser(description="MGPO trainer (one rank)")
    p.add_argument("--config", required=True, help="YAML written by save_config (or a preset name)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--mlflow-run-id", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(args.config, args.overrides)
    from mgpo_core.training.distributed import init_distributed, rank0_first
    from mgpo_core.training.trainer import MGPOTrainer

    init_distributed()
    samples = rank0_first(lambda: load_training_samples(cfg))  # rank 0 writes the synthetic set once
    # Rank 0 builds the offline tiny/base model (when model.path is unset) before any other rank looks at the folder;
    # the others then find it complete. The builder is atomic and locked too, this keeps ranks from even racing.
    rank0_first(lambda: model_dir_for(cfg))

    trainer = MGPOTrainer(
        cfg,
        args.run_dir,
        samples,
        mlflow_run_id=args.mlflow_run_id,
        progress=not args.no_progress,
    )
    manifest = trainer.train()
    if trainer.is_main:
        print(json.dumps({k: v for k, v in manifest.items() if k != "final_metrics"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
