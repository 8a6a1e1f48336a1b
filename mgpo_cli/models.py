"""``mgpo build-tiny`` (the tiny random model) and ``mgpo build-base`` (pre-train the tiny base model, or reuse the
cached or shipped one, and report its skills)."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from mgpo_cli.common import add_config_args, load_from_args


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from mgpo_core.modeling.tiny import build_tiny_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"build-tiny: {out} is not empty; pass --overwrite to replace it or choose an empty directory")
        return 2
    if args.like:
        from mgpo_core.modeling.base import base_model_for
        from mgpo_core.modeling.like import build_like

        source = Path(args.source) if args.source else base_model_for(Path(".mgpo") / "models", seed=args.seed)
        path = build_like(out, source, like=args.like)
        if args.real_widths:
            from mgpo_core.modeling.like import build_real_widths

            small = out.with_name(out.name + ".like-small")
            path.rename(small)
            path = build_real_widths(out, small, text_layers=args.text_layers, vision_depth=args.vision_depth)
            shutil.rmtree(small)
        shards = len(list(path.glob("model-*.safetensors")))
        print(f"{path}  (laid out like {args.like}: {shards} shards + index, weights from {source.name})")
        return 0
    path = build_tiny_model(out, seed=args.seed, overwrite=args.overwrite)
    print(path)
    return 0


def cmd_build_base(args: argparse.Namespace) -> int:
    from mgpo_core.modeling import base, base_skills

    cfg = load_from_args(args)
    seed = cfg.model.tiny_seed if args.seed is None else args.seed
    t0 = time.perf_counter()
    if args.ship:
        target = base.shipped_path(seed)
        out = base.base_model_dir(Path(cfg.state_dir) / "models", seed, progress=not args.no_progress)
        if target.exists():
            shutil.rmtree(target)
        base.export_shipped(out, target)
        out = target
    elif args.out:
        out = base.pretrain_base(args.out, seed=seed, progress=not args.no_progress)
    else:
        out = base.base_model_for(Path(cfg.state_dir) / "models", seed, progress=not args.no_progress)
    took = time.perf_counter() - t0
    note = json.loads((out / base.MANIFEST).read_text())
    print(f"base model {out}")
    print(f"  built in {note['build_seconds']:.0f} s ({note['parameters'] / 1e6:.2f} M parameters); this call {took:.0f} s")
    if args.skills or args.ship:
        skills = note.get("skills") or base_skills.skill_report(out)
        for k, v in sorted(skills.items()):
            print(f"  {k:28s} {v:.3f}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("build-tiny", help="build the tiny offline Qwen2.5-VL into a directory")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--like", choices=["qwen2.5-vl-7b"], default=None,
                   help="lay the directory out as the published checkpoint: sharded weights + index, the real "
                        "vocabulary (152,064 rows), its generation defaults and processor limits")
    p.add_argument("--real-widths", action="store_true",
                   help="with --like: the published widths, random weights (the GPU check's shapes)")
    p.add_argument("--text-layers", type=int, default=28, help="with --real-widths: decoder layers (7B: 28)")
    p.add_argument("--vision-depth", type=int, default=32, help="with --real-widths: vision blocks (7B: 32)")
    p.add_argument("--from", dest="source", default=None,
                   help="with --like: the small checkpoint whose weights it carries (default: the shipped tiny base)")
    p.set_defaults(func=cmd_build_tiny)


    p = sub.add_parser(
        "build-base",
        help="pre-train the tiny base model (synthetic grounding + reading; cached, or the shipped one)",
    )
    add_config_args(p)
    p.add_argument("--seed", type=int, default=None, help="default: model.tiny_seed")
    p.add_argument("--out", default=None, help="build into this empty directory instead of the cache")
    p.add_argument("--ship", action="store_true", help="build and write the shipped copy into the package")
    p.add_argument("--skills", action="store_true", help="measure and print the skills (HF engine, greedy)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build_base)
