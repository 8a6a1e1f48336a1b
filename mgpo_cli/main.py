"""The ``mgpo`` console script: one parser, one sub-command group per module of this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import mgpo_cli.common  # noqa: F401 - the offline environment defaults, before any library is imported

#: The command groups, in ``mgpo --help`` order; each module has ``register(subparsers)``.
COMMAND_GROUPS = (
    "mgpo_cli.demo",  # demo
    "mgpo_cli.config",  # config show|hash|describe
    "mgpo_cli.models",  # build-tiny, build-base
    "mgpo_cli.data",  # data synth|filter
    "mgpo_cli.train",  # train, replay-metrics
    "mgpo_cli.evaluate",  # eval
    "mgpo_cli.pipeline",  # run
    "mgpo_cli.rehearsal",  # rehearsal prepare
    "mgpo_cli.preflight",  # preflight
    "mgpo_cli.servers",  # servers up|down|status|env, deploy, serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgpo", description="MGPO pipeline for Qwen2.5-VL")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_GROUPS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    from mgpo_core.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"mgpo: configuration error:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
