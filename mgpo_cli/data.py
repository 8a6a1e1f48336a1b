"""`mgpo data ...`: make the synthetic V*-style dataset and run the filter stage from the command line.

mgpo data synth --out data/synth --train 64 --eval 32 --width 3840 --height 2160 --seed 0
mgpo data filter --input MME-RealWorld.json --root /data/mme --out datasets [--set data.filters.pass_rate=true]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mgpo_cli.common import add_config_args, load_from_args

FORMAT_CHOICES = ("auto", "mgpo", "mme-realworld", "vstar", "vstar-parquet", "hrbench", "jsonl")


def cmd_synth(args: argparse.Namespace) -> int:
    from mgpo_core.data.synthetic import synthetic_options, write_synthetic_dataset

    cfg = load_from_args(args)
    options = {
        **synthetic_options(cfg),
        "seed": cfg.data.shuffle_seed if args.seed is None else args.seed,
        "width": args.width or cfg.data.synthetic_width,
        "height": args.height or cfg.data.synthetic_height,
    }
    side = 4 * options["min_target_px"]
    if min(options["width"], options["height"]) < side:  # checked before anything is written
        print(
            f"mgpo data synth: a {options['width']}x{options['height']} image is too small for the config's "
            f"{options['min_target_px']}-px tag (data.synthetic_tag_px): each side needs at least {side} px. "
            f"Pass --width/--height of {side} or more, or a smaller tag, e.g. --set data.synthetic_tag_px="
            f"{max(1, min(options['width'], options['height']) // 4)}",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    paths = write_synthetic_dataset(
        args.out,
        args.train,
        args.eval,
        **options,
        image_format=args.image_format,
        overview_max_pixels=cfg.rollout.max_pixels,
        workers=args.workers,
    )
    took = time.perf_counter() - t0
    n = args.train + args.eval
    print(f"synthetic: {n} images in {took:.1f}s ({n / max(took, 1e-9):.1f} images/s)")
    for split, path in paths.items():
        print(f"{split:6s}{path}")
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from mgpo_core.data.readers import DataInputError
    from mgpo_core.data.stage import InputSpec, run_filter_stage

    overrides = list(args.overrides)
    if args.root is not None:
        overrides.append(f"data.root={Path(args.root).resolve()}")
    args.overrides = overrides
    cfg = load_from_args(args)
    try:
        result = run_filter_stage(
            cfg,
            [InputSpec(p, args.format) for p in args.input],
            args.out,
            progress=False if args.no_progress else None,
        )
    except DataInputError as err:
        print(f"mgpo data filter: {err}", file=sys.stderr)
        return 2
    c = result.report["counts"]
    print(f"dataset   {result.dataset_dir}")
    print(f"rows      {c['in']} in = {c['kept']} kept + {c['dropped']} dropped")
    for reason, n in result.report["dropped_by_reason"].items():
        print(f"  {reason:24s}{n}")
    print(f"report    {result.dataset_dir / 'report.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to the ``mgpo`` parser."""

    data = subparsers.add_parser("data", help="make the synthetic dataset, filter a dataset")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic V*-style high-resolution train and eval splits")
    add_config_args(p)
    p.add_argument("--out", required=True, help="folder; gets train/ and eval/ with images and samples.jsonl")
    p.add_argument("--train", type=int, required=True, help="number of training samples")
    p.add_argument("--eval", type=int, required=True, help="number of evaluation samples")
    p.add_argument("--width", type=int, default=None, help="image width (default data.synthetic_width)")
    p.add_argument("--height", type=int, default=None, help="image height (default data.synthetic_height)")
    p.add_argument("--seed", type=int, default=None, help="seed (default data.shuffle_seed)")
    p.add_argument(
        "--image-format",
        choices=("jpeg", "png"),
        default="jpeg",
        help="jpeg (quality 95, 4:4:4; fast) or png (lossless, ~10x slower at 4K)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes generating images")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("filter", help="read, check and de-duplicate a dataset into a versioned folder")
    add_config_args(p)
    p.add_argument(
        "--input", action="append", required=True, metavar="PATH", help="data file or V* folder (repeatable)"
    )
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto", help="input format (auto detects)")
    p.add_argument("--root", default=None, help="data root images must stay inside (sets data.root)")
    p.add_argument(
        "--out", required=True, help="folder the dataset directory <content hash>/ is written into"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_filter)
