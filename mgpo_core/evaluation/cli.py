"""`mgpo eval`: evaluate a model on registered benchmarks in MGPO two-turn or direct mode, write the outputs
and log the metrics to MLflow (optionally attached to a registered model version).

    mgpo eval --benchmark vstar --data /data/vstar --mode mgpo --limit 50 --engine auto --out runs/eval
    mgpo eval --benchmark synthetic --mode direct --set evaluation.direct_max_pixels=1003520

Without --benchmark the config's `evaluation.benchmarks` run; each writes into `<out>/<benchmark>-<mode>/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mgpo_core.config import MGPOConfig
    from mgpo_core.rollout.base import RolloutEngine

__all__ = ["build_engine", "cmd_eval", "default_tracking_uri", "register"]


def default_tracking_uri(cfg: MGPOConfig) -> str:
    """``tracking.mlflow_tracking_uri``, else the local SQLite store ``<state_dir>/mlflow.db`` (as training
    uses)."""
    if cfg.tracking.mlflow_tracking_uri:
        return cfg.tracking.mlflow_tracking_uri
    state = Path(cfg.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'mlflow.db'}"


def build_engine(cfg: MGPOConfig, name: str | None = None) -> RolloutEngine:
    """A rollout engine for ``cfg.model`` by registry name (``hf``, ``vllm``, ``auto``; default
    ``rollout.engine``). The HF engine runs on CUDA when available, else CPU."""
    import torch

    from mgpo_core.episodes import PromptTemplates
    from mgpo_core.modeling.loading import load_bundle, model_dir_for
    from mgpo_core.rollout import ENGINES, RolloutSettings, resolve_engine_name

    engine = resolve_engine_name(name or cfg.rollout.engine)
    path = model_dir_for(cfg)
    if engine == "hf":
        bundle = load_bundle(
            path,
            dtype=cfg.model.dtype,
            device="cuda" if torch.cuda.is_available() else "cpu",
            attn_implementation=cfg.model.attn_implementation,
        )
        return ENGINES["hf"](
            model=bundle.model,
            tokenizer=bundle.tokenizer,
            image_processor=bundle.image_processor,
            special=bundle.special,
            templates=PromptTemplates.from_config(cfg.rollout),
            settings=RolloutSettings.from_config(cfg),
            batch_size=cfg.evaluation.batch_size,
        )
    # Other engines (vLLM) load the weights themselves from the directory: only the text/image pieces here.
    from transformers import AutoConfig

    from mgpo_core.evaluation.direct import model_max_pixels
    from mgpo_core.imaging import overview_area_bound
    from mgpo_core.modeling.loading import (
        load_image_processor,
        load_tokenizer,
        model_vocab_size,
        special_tokens_from,
    )

    tokenizer = load_tokenizer(path)
    image_processor = load_image_processor(path)
    rows = model_vocab_size(AutoConfig.from_pretrained(path, local_files_only=True))
    # vLLM re-applies smart_resize with these bounds; it is the identity on our 28-multiple images as long as
    # the upper bound also admits the direct mode's full-resolution image, not only the MGPO overview.
    direct = cfg.evaluation.direct_max_pixels or model_max_pixels(image_processor)
    return ENGINES[engine](
        model_dir=path,
        tokenizer=tokenizer,
        image_processor=image_processor,
        special=special_tokens_from(tokenizer, rows),
        cfg=cfg,
        mm_processor_kwargs={
            "min_pixels": 28 * 28,
            "max_pixels": overview_area_bound(max(cfg.rollout.max_pixels, direct)),
        },
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from mgpo_core.cli import load_from_args
    from mgpo_core.evaluation.registry import get_benchmark
    from mgpo_core.evaluation.runner import evaluate

    cfg = load_from_args(args)
    names = args.benchmark or list(cfg.evaluation.benchmarks)
    if args.data is not None and len(names) != 1:
        print(
            f"mgpo eval: --data names one data path but {len(names)} benchmarks run ({names}); pass one "
            "--benchmark with it",
            file=sys.stderr,
        )
        return 2
    if args.image_root is not None:
        if len(names) != 1:
            print(
                f"mgpo eval: --image-root names one image folder but {len(names)} benchmarks run ({names}); "
                "pass one --benchmark with it, or set evaluation.image_roots.<benchmark>",
                file=sys.stderr,
            )
            return 2
        cfg.evaluation.image_roots[names[0]] = args.image_root
    try:
        specs = [get_benchmark(n) for n in names]
    except KeyError as exc:
        print(f"mgpo eval: {exc.args[0]}", file=sys.stderr)
        return 2
    if (args.model_name is None) != (args.model_version is None):
        print(
            "mgpo eval: give --model-name and --model-version together (the registered model version the "
            "metrics are attached to)",
            file=sys.stderr,
        )
        return 2
    for spec in specs:
        data = args.data or cfg.evaluation.data_paths.get(spec.name, cfg.data.eval_path)
        if spec.needs_data and data is None:
            print(
                f"mgpo eval: benchmark {spec.name!r} needs its data: pass --data PATH; {spec.data_hint}",
                file=sys.stderr,
            )
            return 2
    mode = args.mode or cfg.evaluation.mode
    limit = args.limit if args.limit is not None else cfg.evaluation.limit
    out_root = (
        Path(args.out)
        if args.out
        else Path(cfg.state_dir) / "eval" / f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    engine = build_engine(cfg, args.engine)
    results = []
    try:
        for spec in specs:
            results.append(
                evaluate(
                    cfg,
                    spec,
                    engine,
                    out_root / f"{spec.name}-{mode}",
                    limit=limit,
                    mode=mode,
                    data_path=args.data,
                    progress=not args.no_progress,
                )
            )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        # Data problems (missing file, no questions, unlabelled rows) are the user's to fix: no traceback.
        print(f"mgpo eval: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    report: dict[str, Any] = {
        "out": str(out_root),
        "metrics": {k: v for r in results for k, v in r.prefixed().items()},
    }
    if not args.no_mlflow:
        from mgpo_core.evaluation.mlflow_log import log_eval_results

        uri = args.tracking_uri or default_tracking_uri(cfg)
        from mgpo_core.training.tracking import artifact_root

        report["mlflow_run_id"] = log_eval_results(
            results,
            tracking_uri=uri,
            run_id=args.run_id or cfg.tracking.run_id,
            experiment_name=cfg.tracking.experiment_name,
            run_name=f"{cfg.run_name}-eval",
            model_name=args.model_name,
            model_version=args.model_version,
            artifact_location=artifact_root(cfg.state_dir, uri),
        )
        report["mlflow_tracking_uri"] = uri
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``eval`` command to the ``mgpo`` command line."""
    from mgpo_core.cli import add_config_args

    p = subparsers.add_parser("eval", help="evaluate a model on benchmarks (MGPO two-turn or direct)")
    p.add_argument(
        "--benchmark",
        action="append",
        default=None,
        metavar="NAME",
        help="registered benchmark (repeatable): vstar, hrbench_4k, hrbench_8k, mme_realworld, "
        "mme_realworld_lite, synthetic; default evaluation.benchmarks",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="the benchmark's data file or folder "
        "(default evaluation.data_paths[NAME], then data.eval_path; synthetic generates its set when none "
        "is given)",
    )
    p.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="folder the benchmark's relative image paths start from (default evaluation.image_roots[NAME], "
        "then the data file's folder); MME-RealWorld's images are published apart from its JSON",
    )
    p.add_argument(
        "--mode",
        choices=["mgpo", "direct"],
        default=None,
        help="mgpo: ground, crop, answer (two turns); direct: one turn at evaluation.direct_max_pixels",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="deterministic subsample of N questions per benchmark (default evaluation.limit)",
    )
    p.add_argument("--engine", choices=["hf", "vllm", "auto"], default=None, help="default rollout.engine")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default <state_dir>/eval/<run>-<time>)"
    )
    p.add_argument(
        "--model-name", default=None, help="registered model whose version gets the metrics as tags"
    )
    p.add_argument("--model-version", default=None, help="that model version")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default tracking.mlflow_tracking_uri or sqlite:///<state_dir>/mlflow.db)",
    )
    p.add_argument("--run-id", default=None, help="log into this existing MLflow run instead of a new one")
    p.add_argument("--no-mlflow", action="store_true", help="write the files only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=cmd_eval)
