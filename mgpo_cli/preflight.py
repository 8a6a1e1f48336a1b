"""``mgpo preflight``: the checks ``mgpo run`` makes before any stage starts, printed as a table."""

from __future__ import annotations

import argparse
import sys
import time

from mgpo_cli.common import add_config_args, load_from_args


def print_checks(checks, file=sys.stdout) -> None:  # noqa: ANN001
    for c in checks:
        print(c.line(), file=file)


def cmd_preflight(args: argparse.Namespace) -> int:
    from mgpo_core.ops.preflight import run_preflight

    cfg = load_from_args(args)
    t0 = time.perf_counter()
    checks = run_preflight(cfg, args.inputs, skip=args.skip)
    print(f"preflight of {args.preset or 'the default preset'} ({time.perf_counter() - t0:.1f} s)")
    print_checks(checks)
    failed = [c for c in checks if c.status == "fail"]
    print(f"{len(failed)} failed, {sum(c.status == 'warn' for c in checks)} warning(s)")
    return 1 if failed else 0


def register(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("preflight", help="check model, kernels, devices, hosts, data, disk and tracking in seconds")
    add_config_args(p)
    p.add_argument("--input", dest="inputs", action="append", default=[], help="the training input(s) mgpo run gets")
    p.add_argument("--skip", action="append", default=[], help="a check not to run (repeatable), e.g. hosts")
    p.set_defaults(func=cmd_preflight)
