"""``mgpo rehearsal prepare``: the inputs of the 7B rehearsal (preset ``rehearsal-7b``), shaped like the real ones.

Writes into ``--dir`` (default ``$MGPO_REHEARSAL_DIR`` or ``.mgpo/rehearsal``, where the preset looks):
``model/`` (a small checkpoint laid out as Qwen2.5-VL-7B-Instruct: sharded weights + index, the real
vocabulary, the Instruct generation defaults) and ``data/`` (MME-RealWorld JSON for training; V*, HR-Bench
4K/8K and MME-RealWorld-Lite in their published formats for evaluation, the Lite file overlapping the training
file as the real one does). Then prints the command that runs the recipe on them.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def default_dir() -> Path:
    return Path(os.environ.get("MGPO_REHEARSAL_DIR") or ".mgpo/rehearsal")


def cmd_prepare(args: argparse.Namespace) -> int:
    from mgpo_core.data.published import write_published_sets
    from mgpo_core.modeling.base import base_model_for
    from mgpo_core.modeling.like import like_model_dir

    root = Path(args.dir) if args.dir else default_dir()
    t0 = time.perf_counter()
    source = base_model_for(root / "cache", seed=0)
    built = like_model_dir(root / "cache", source)
    model = root / "model"
    if model.is_symlink() or model.exists():
        if model.is_symlink() or model.is_file():
            model.unlink()
        else:
            import shutil

            shutil.rmtree(model)
    model.symlink_to(built.resolve(), target_is_directory=True)
    paths = write_published_sets(root / "data", train=args.train, per_benchmark=args.per_benchmark,
                                 overlap=args.overlap, seed=args.seed)  # fmt: skip
    print(f"rehearsal inputs in {root} ({time.perf_counter() - t0:.0f} s)")
    print(f"  model   {model} -> {built.name} (laid out as Qwen2.5-VL-7B-Instruct)")
    for name, p in paths.items():
        print(f"  {name:<19} {p}")
    env = "" if root == Path(".mgpo/rehearsal") else f"MGPO_REHEARSAL_DIR={root} "
    print(f"run it:  {env}mgpo run --preset rehearsal-7b --input {paths['train']}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("rehearsal", help="inputs for the 7B recipe's CPU rehearsal (preset rehearsal-7b)")
    s = p.add_subparsers(dest="rehearsal_command", required=True)
    q = s.add_parser("prepare", help="write the 7B-shaped model and the published-format data")
    q.add_argument("--dir", default=None, help="default: $MGPO_REHEARSAL_DIR or .mgpo/rehearsal")
    q.add_argument("--train", type=int, default=48, help="training questions (MME-RealWorld JSON)")
    q.add_argument("--per-benchmark", type=int, default=8, help="questions per evaluation benchmark")
    q.add_argument("--overlap", type=int, default=4, help="Lite items that are also training items")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_prepare)
