"""``mgpo train`` (launch the training process group, resume by rerunning) and ``mgpo replay-metrics``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mgpo_cli.common import add_config_args, load_from_args


def cmd_train(args: argparse.Namespace) -> int:
    from mgpo_core.training.launch import TrainingFailed, launch_training

    cfg = load_from_args(args)
    run_dir = Path(args.run_dir or Path(cfg.state_dir) / "runs" / cfg.run_name)
    print(f"training {cfg.run_name}: run directory {run_dir} (rerun the same command to resume)")
    try:
        manifest = launch_training(cfg, run_dir, mlflow_run_id=args.mlflow_run_id, on_line=print)
    except TrainingFailed as e:
        print(f"mgpo train: {e}")
        return 1
    print(json.dumps({k: v for k, v in manifest.items() if k != "final_metrics"}, indent=1))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from mgpo_core.ops.tracking import replay_pending

    n = replay_pending(args.run_dir, args.tracking_uri, args.run_id)
    print(f"delivered {n} pending metric records to run {args.run_id}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type

    p = sub.add_parser("train", help="run MGPO training (DeepSpeed process group); rerun to resume")
    add_config_args(p)
    p.add_argument("--run-dir", default=None, help="default: <state_dir>/runs/<run_name>")
    p.add_argument("--mlflow-run-id", default=None, help="reattach metrics to this MLflow run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "replay-metrics", help="deliver metrics a run kept locally while MLflow was unreachable"
    )
    p.add_argument("--run-dir", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--run-id", required=True)
    p.set_defaults(func=cmd_replay)
