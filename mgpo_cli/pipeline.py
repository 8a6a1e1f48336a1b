"""``mgpo run``: the whole pipeline on the embedded default (or any preset), with a closing summary.

Prefect's environment is prepared before Prefect is imported: the local servers when ``mgpo servers up`` runs
them, otherwise the ephemeral API with its state under the project's state folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mgpo_cli.common import add_config_args, load_from_args
from mgpo_core.config import DEFAULT_PRESET


def _prepare_environment(state_dir: str) -> tuple[str | None, str | None]:
    """Point Prefect and MLflow at the local servers when they run; returns (prefect_url, mlflow_url)."""
    (Path(state_dir) / "prefect" / "storage").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(
        "PREFECT_SERVER_ANALYTICS_ENABLED", "false"
    )  # its telemetry row races SQLite at start
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # The ephemeral API starts a local server; on a busy 2-core machine the default 20 s (even 120 s) is not enough.
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300"
    )  # keep the pipeline's log about the pipeline
    from mgpo_core.ops.servers import active_endpoints, apply_prefect_env

    apply_prefect_env(state_dir)
    ep = active_endpoints(state_dir)
    return ep.prefect_api_url, ep.mlflow_uri


def cmd_run(args: argparse.Namespace) -> int:

    cfg = load_from_args(args)  # validates the preset and overrides before anything starts
    prefect_url, mlflow_url = _prepare_environment(cfg.state_dir)
    overrides = list(args.overrides)
    if mlflow_url and not cfg.tracking.mlflow_tracking_uri:
        overrides.append(f"tracking.mlflow_tracking_uri={mlflow_url}")
    from mgpo_core.config import load_config
    from mgpo_core.config.secrets import redact
    from mgpo_core.ops.tracking import tracking_uri_for

    cfg = load_config(args.preset, overrides)  # the store the run will use (the local server's when it runs)
    if not args.no_preflight and not _preflight_passes(cfg, args):
        return 2
    # What the run talks to, as the user configured it (an external Prefect API, a tracking server), secrets masked.
    prefect_url = prefect_url or os.environ.get("PREFECT_API_URL") or None
    mlflow_url = mlflow_url or (redact(tracking_uri_for(cfg)) if cfg.tracking.mlflow_tracking_uri else None)
    if args.refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    if args.verbose:
        from flows.nightly import nightly

        t0 = time.perf_counter()
        summary = nightly(preset=args.preset or DEFAULT_PRESET, overrides=overrides, inputs=args.inputs)
        print_summary(summary, cfg.state_dir, prefect_url, mlflow_url, time.perf_counter() - t0)
        return 0
    import shlex

    from flows.nightly import nightly  # imports Prefect, which configures its logging: hook in after that
    from tasks.console import clean_console, failure_paragraph, park_output

    t0 = time.perf_counter()
    failure, summary = None, None
    with clean_console(cfg.state_dir) as console:
        where = f"Prefect {prefect_url}" if prefect_url else "Prefect ephemeral API"
        console.say(
            f"MGPO pipeline ({args.preset or DEFAULT_PRESET}; {where}; MLflow {mlflow_url or 'SQLite store'})\n"
            f"  logs      {console.dir}/<stage>.log"
        )
        try:
            summary = nightly(preset=args.preset or DEFAULT_PRESET, overrides=overrides, inputs=args.inputs)
        except Exception as e:  # noqa: BLE001 - reported as one paragraph; the traceback is in the log
            import traceback

            traceback.print_exc()  # into the current log file
            rerun = (
                " ".join(shlex.quote(a) for a in ["mgpo", "run", *sys.argv[2:]])
                if len(sys.argv) > 1
                else "mgpo run"
            )
            failure = failure_paragraph(console, e, rerun)
    if failure is not None:
        print(failure, file=sys.stderr)
        park_output(console.log_path("pipeline"))
        return 1
    print_summary(summary, cfg.state_dir, prefect_url, mlflow_url, time.perf_counter() - t0)
    park_output(console.log_path("pipeline"))
    return 0


def _preflight_passes(cfg, args: argparse.Namespace) -> bool:  # noqa: ANN001
    """``mgpo preflight`` before any stage: failures are printed with their fixes and nothing starts."""
    from mgpo_cli.preflight import print_checks
    from mgpo_core.ops.preflight import run_preflight

    checks = run_preflight(cfg, args.inputs)
    failed = [c for c in checks if c.status == "fail"]
    warned = [c for c in checks if c.status == "warn"]
    if failed:
        print(f"mgpo run: preflight found {len(failed)} problem(s); nothing was started:", file=sys.stderr)
        print_checks(failed + warned, file=sys.stderr)
        print("(mgpo preflight prints every check; --no-preflight skips them)", file=sys.stderr)
        return False
    if warned:
        print_checks(warned)
    return True


def print_summary(
    summary: dict, state_dir: str, prefect_url: str | None, mlflow_url: str | None, seconds: float
) -> None:
    from tasks.artifacts import champion_line, metric_rows

    state = Path(state_dir).resolve()
    ev, promo = summary["evaluation"], summary["promotion"]
    ds = summary["dataset"]
    print(f"\n══ MGPO pipeline finished in {seconds:.0f} s ══")
    counts = ds.get("report", {}).get("counts", {})
    print(
        f"dataset    {ds['dataset_dir']}  rows in {counts.get('in')}, kept {counts.get('kept')}, "
        f"dropped {counts.get('dropped')}"
    )
    print(f"training   {summary['train']['steps_done']} RL steps, run dir {summary['train']['run_dir']}")
    print(f"model      {champion_line(summary)}")
    print(f"           {promo['reason']}")
    has_base = bool((summary.get("baseline") or {}).get("metrics"))
    if has_base:
        print(f"{'':11}{'':44}{'base':>8}{'trained':>9}")
    for k, b, v in metric_rows(summary):
        shown = f"{b:8.4f}" if b is not None else f"{'':8}"
        print(f"metric     {k:<44}{shown} {v:8.4f}" if has_base else f"metric     {k} = {v:.4f}")
    if ev.get("pictures"):
        print(f"pictures   {ev['pictures'][0]}")
    print(
        f"MLflow UI  {mlflow_url or f'.venv/bin/mlflow ui --backend-store-uri sqlite:///{state}/mlflow.db'}"
    )
    print(
        f"Prefect UI {prefect_url.removesuffix('/api') if prefect_url else '.venv/bin/mgpo servers up (then rerun: finished stages come from cache)'}"
    )


def register(sub) -> None:  # noqa: ANN001

    p = sub.add_parser(
        "run", help="run the whole pipeline: filter → train → select → register → evaluate → promote"
    )
    add_config_args(p)
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        help="raw dataset input for the filter stage (repeatable; default: the synthetic set)",
    )
    p.add_argument("--refresh", action="store_true", help="ignore cached stage results and run every stage")
    p.add_argument("--no-preflight", action="store_true", help="skip the checks made before any stage starts")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print every log line of every stage and library on the console (default: progress and summary; "
        "the rest goes to <state>/logs/<run>/<stage>.log)",
    )
    p.set_defaults(func=cmd_run)
