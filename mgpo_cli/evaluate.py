"""`mgpo eval`: evaluate a model on registered benchmarks in MGPO two-turn or direct mode, write the outputs
and log the metrics to MLflow (optionally attached to a registered model version).

    mgpo eval --benchmark vstar --data /data/vstar --mode mgpo --limit 50 --engine auto --out runs/eval
    mgpo eval --benchmark synthetic --mode direct --set evaluation.direct_max_pixels=1003520
    mgpo eval --model models:/mgpo-policy@champion --benchmark synthetic   # a registered version, fetched from MLflow

Without --benchmark the config's `evaluation.benchmarks` run; each writes into `<out>/<benchmark>-<mode>/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgpo_cli.common import add_config_args, load_from_args

if TYPE_CHECKING:
    pass

__all__ = ["cmd_eval", "register"]


def cmd_eval(args: argparse.Namespace) -> int:
    from mgpo_core.evaluation.benchmarks import get_benchmark
    from mgpo_core.evaluation.runner import evaluate
    from mgpo_core.rollout.factory import build_rollout_engine

    cfg = load_from_args(args)
    if args.model is not None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": args.model})})
    if args.tracking_uri:  # the store a models:/ URI is resolved in is the one the results go to
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"mlflow_tracking_uri": args.tracking_uri})})
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
    from mgpo_core.modeling.loading import ModelPathError
    from mgpo_core.modeling.source import base_model_lineage

    try:
        lineage = base_model_lineage(cfg)  # a registry URI is resolved (and fetched) here, once
        engine = build_rollout_engine(cfg, args.engine)
    except ModelPathError as exc:
        print(f"mgpo eval: {exc}", file=sys.stderr)
        return 2
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
        "model": lineage,
    }
    if not args.no_mlflow:
        from mgpo_core.ops.eval_log import log_eval_results
        from mgpo_core.ops.tracking import artifact_root, tracking_uri_for

        uri = args.tracking_uri or tracking_uri_for(cfg)

        report["mlflow_run_id"] = log_eval_results(
            results,
            tracking_uri=uri,
            run_id=args.run_id or cfg.tracking.run_id,
            experiment_name=cfg.tracking.experiment_name,
            run_name=f"{cfg.run_name}-eval",
            model_name=args.model_name,
            model_version=args.model_version,
            artifact_location=artifact_root(cfg.state_dir, uri),
            extra_tags={k.replace("mgpo.base_model", "mgpo.eval.model_source"): v for k, v in lineage.items()},
        )
        report["mlflow_tracking_uri"] = uri
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``eval`` command to the ``mgpo`` command line."""

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
        "--model",
        default=None,
        metavar="DIR_OR_URI",
        help="the model to evaluate: a Hugging Face checkpoint directory, or a registered version "
        "models:/NAME@ALIAS or models:/NAME/VERSION (fetched from the tracking store); default model.path",
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
