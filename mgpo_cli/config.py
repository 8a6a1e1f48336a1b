"""``mgpo config show|hash|describe``: the resolved config, its hash, or the reference of every field."""

from __future__ import annotations

import argparse

from mgpo_cli.common import add_config_args, load_from_args


def cmd_config(args: argparse.Namespace) -> int:
    from mgpo_core.config import config_hash, describe_config, to_yaml

    if args.action == "describe":
        print(describe_config())
        return 0
    cfg = load_from_args(args)
    print(
        config_hash(cfg) if args.action == "hash" else to_yaml(cfg), end="\n" if args.action == "hash" else ""
    )
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("config", help="show the resolved config, its hash, or the config reference")
    p.add_argument("action", choices=["show", "hash", "describe"])
    add_config_args(p)
    p.set_defaults(func=cmd_config)
