"""Serve one flow as a cron-scheduled Prefect deployment from this process (``mgpo serve`` execs this script).

It lives outside ``mgpo_core`` because it imports Prefect. Run it from the repository root, with the Prefect
environment already prepared (``PREFECT_API_URL`` set): entrypoints are ``path/to/file.py:function`` relative to
the working directory, and that directory is where the served runs start.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entrypoint", required=True, help="path/to/file.py:flow_function")
    p.add_argument("--name", required=True, help="deployment name")
    p.add_argument("--cron", required=True, help="cron expression")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--params", default="{}", help="default parameters of the runs, as a JSON object")
    p.add_argument("--limit", type=int, default=1, help="deployment concurrency limit (and runner limit)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = json.loads(args.params)
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    flow = load_flow_from_entrypoint(args.entrypoint)
    accepted = set(inspect.signature(flow.fn).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        print(
            f"serve: flow {args.entrypoint} takes no parameter(s) {unknown}; it accepts {sorted(accepted)}",
            file=sys.stderr,
        )
        return 2
    # global_limit is the deployment's concurrency limit (enforced by the API for every executor of it);
    # limit caps what this one runner executes at once.
    flow.serve(
        name=args.name,
        schedule=Cron(args.cron, timezone=args.timezone),
        parameters=params,
        global_limit=args.limit,
        limit=args.limit,
        pause_on_shutdown=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
