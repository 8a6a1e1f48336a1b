"""What every command group shares: the offline environment defaults and the ``--preset``/``--set`` options."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mgpo_core.config import MGPOConfig

# Commands never reach a model hub, and libraries stay quiet unless asked.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=None,
        help="preset name (tiny-base-cpu, the default; tiny-cpu; qwen2.5-vl-7b-8gpu) or a YAML path",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set rollout.n=4 (repeatable; VALUE is parsed as YAML)",
    )


def load_from_args(args: argparse.Namespace) -> MGPOConfig:
    from mgpo_core.config import load_config

    return load_config(args.preset, args.overrides)
