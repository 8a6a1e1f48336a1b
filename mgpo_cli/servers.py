"""``mgpo servers up|down|status|env``, ``mgpo deploy`` and ``mgpo serve``: local servers and the nightly schedule.

Nothing here imports Prefect (``mgpo_core`` never does): ``deploy`` runs Prefect's own CLI on the deployment
defined in ``infra/prefect.yaml`` and ``serve`` replaces this process with ``infra/servers/serve.py``, each in the
environment ``apply_prefect_env`` prepares, so they need a source checkout of the project.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from mgpo_cli.common import add_config_args
from mgpo_core.ops.servers import (
    DEFAULT_PORTS,
    SERVER_NAMES,
    ServersError,
    active_endpoints,
    apply_prefect_env,
    is_healthy,
    read_records,
    running_servers,
    servers_dir,
    start_servers,
    stop_servers,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "infra" / "prefect.yaml"
SERVE_SCRIPT = REPO_ROOT / "infra" / "servers" / "serve.py"
NIGHTLY = "mgpo-nightly"


class DeployError(RuntimeError):
    """The deployment cannot be registered or served as asked; the message says how to fix it."""


def _default_state_dir(args: argparse.Namespace) -> str:
    if getattr(args, "state_dir", None):
        return args.state_dir
    from mgpo_core.config import load_config

    return load_config(getattr(args, "preset", None), getattr(args, "overrides", [])).state_dir


# ── servers ──────────────────────────────────────────────────────────────────────────────────────────────────


def cmd_servers(args: argparse.Namespace) -> int:
    state = _default_state_dir(args)
    try:
        return {"up": _up, "down": _down, "status": _status, "env": _env}[args.action](args, state)
    except ServersError as e:
        print(f"mgpo servers {args.action}: {e}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace, state: str) -> int:
    ports = {"prefect": args.prefect_port, "mlflow": args.mlflow_port}
    only = [args.only] if args.only else None
    records = start_servers(state, ports=ports, only=only, timeout=args.timeout)
    for rec in records.values():
        print(f"{rec.name:8s} {rec.url:32s} UI {rec.ui_url:24s} pid {rec.pid}  healthy")
    print(f"state    {servers_dir(state)}  (logs in logs/, record in servers.json)")
    print('use      eval "$(mgpo servers env)"   # point Prefect/MLflow clients in this shell at them')
    print("stop     mgpo servers down")
    return 0


def _down(args: argparse.Namespace, state: str) -> int:
    outcome = stop_servers(state, timeout=args.timeout)
    if not outcome:
        print(f"no servers recorded under {servers_dir(state)}")
    for name, what in outcome.items():
        print(f"{name:8s} {what}")
    return 0


def _status(args: argparse.Namespace, state: str) -> int:
    records = read_records(state)
    if not records:
        print(f"no servers running under {servers_dir(state)} (start them with `mgpo servers up`)")
        return 3
    alive = running_servers(state)
    all_ok = True
    for name, rec in records.items():
        healthy = name in alive and is_healthy(rec.health_url)
        all_ok &= healthy
        state_word = "healthy" if healthy else ("unhealthy" if name in alive else "not running")
        print(f"{name:8s} {rec.url:32s} UI {rec.ui_url:24s} pid {rec.pid}  {state_word}")
    return 0 if all_ok else 3


def _env(args: argparse.Namespace, state: str) -> int:
    env: dict[str, str] = {}
    apply_prefect_env(state, env)
    mlflow = active_endpoints(state).mlflow_uri
    if mlflow:
        env["MLFLOW_TRACKING_URI"] = mlflow
    for k, v in sorted(env.items()):
        print(f"export {k}={shlex.quote(v)}")
    return 0


# ── the nightly deployment ───────────────────────────────────────────────────────────────────────────────────


def load_deployment_spec(
    path: Path = PREFECT_YAML, name: str = NIGHTLY
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the whole prefect.yaml, the deployment called ``name`` in it)."""
    if not path.is_file():
        raise DeployError(
            f"{path} is missing: `mgpo deploy` and `mgpo serve` need a source checkout of the project"
        )
    data = yaml.safe_load(path.read_text()) or {}
    for spec in data.get("deployments") or []:
        if spec.get("name") == name:
            return data, spec
    raise DeployError(f"{path} defines no deployment named {name!r}; add it under `deployments:`")


def _schedule(spec: dict[str, Any], args: argparse.Namespace) -> tuple[str, str]:
    """(cron, time zone): the command line's, else the deployment's first cron schedule (UTC by default)."""
    cron, tz = args.cron, args.timezone
    for s in spec.get("schedules") or []:
        if s.get("cron"):
            cron, tz = cron or str(s["cron"]), tz or s.get("timezone")
            break
    if not cron:
        raise DeployError(
            f"deployment {spec.get('name')!r} in {PREFECT_YAML} has no cron schedule; pass --cron EXPR"
        )
    return cron, tz or "UTC"


def _concurrency(spec: dict[str, Any]) -> int:
    limit = spec.get("concurrency_limit")
    return int(limit.get("limit", 1) if isinstance(limit, dict) else limit or 1)


def deployment_parameters(
    args: argparse.Namespace, spec: dict[str, Any], state: str, mlflow: str | None
) -> dict:
    """The nightly flow's parameters: preset + overrides from the file and the command line.

    The state folder is pinned (runs start in the repository root, whatever folder ``mgpo`` ran in) and, when
    the local MLflow server answers, the tracking URI points at it. The result is validated now, so a broken
    override fails at deploy time and not at 2 a.m.
    """
    from mgpo_core.config import load_config

    params = dict(spec.get("parameters") or {})
    if args.preset:
        params["preset"] = args.preset
    overrides = [*(params.get("overrides") or []), *args.overrides, f"state_dir={Path(state).resolve()}"]
    if mlflow and not any(o.startswith("tracking.mlflow_tracking_uri=") for o in overrides):
        overrides.append(f"tracking.mlflow_tracking_uri={mlflow}")
    params["overrides"] = overrides
    load_config(params.get("preset"), overrides)  # ConfigError → `mgpo` reports it with exit code 2
    return params


def _parameters_for(args: argparse.Namespace, spec: dict[str, Any], entrypoint: str, state: str) -> dict:
    """The nightly flow's full parameters, or for another flow (``flows/smoke.py:smoke``) only what was asked."""
    if entrypoint == spec["entrypoint"]:
        return deployment_parameters(args, spec, state, active_endpoints(state).mlflow_uri)
    params: dict[str, Any] = {"preset": args.preset} if args.preset else {}
    if args.overrides:
        params["overrides"] = list(args.overrides)
    return params


def _prefect_env(state: str) -> tuple[dict[str, str], str]:
    """The environment for Prefect's CLI and the API URL it will use; DeployError without a server."""
    env = dict(os.environ)
    apply_prefect_env(state, env)
    env.setdefault("PREFECT_CLI_PROMPT", "false")
    api = env.get("PREFECT_API_URL")
    if not api:
        raise DeployError(
            f"no Prefect server to register with: none runs for state folder {Path(state).resolve()}. "
            "Start the local one with `mgpo servers up` (or export PREFECT_API_URL=<server>/api), then retry."
        )
    if not is_healthy(api.rstrip("/") + "/health"):
        raise DeployError(
            f"the Prefect API at {api} does not answer /health; is the server up? (`mgpo servers status`)"
        )
    return env, api


def _ensure_process_pool(api: str, pool: str, env: dict[str, str]) -> bool:
    """Create work pool ``pool`` (type process) unless it exists; True if it was created."""
    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/work_pools/{urllib.parse.quote(pool)}", timeout=10):
            return False
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise DeployError(f"reading work pool {pool!r} from {api} failed: HTTP {e.code}") from e
    except urllib.error.URLError as e:
        raise DeployError(
            f"the Prefect API at {api} stopped answering ({e.reason}); check `mgpo servers status`"
        ) from e
    cmd = [sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"]
    p = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise DeployError(f"creating work pool {pool!r} failed:\n{p.stdout}{p.stderr}")
    return True


def cmd_deploy(args: argparse.Namespace) -> int:
    state = _default_state_dir(args)
    try:
        env, api = _prefect_env(state)
        data, spec = load_deployment_spec()
        spec = copy.deepcopy(spec)
        cron, tz = _schedule(spec, args)
        spec["name"] = args.name
        spec["schedules"] = [{"cron": cron, "timezone": tz, "active": True}]
        entrypoint = args.entrypoint or spec["entrypoint"]
        spec["parameters"] = _parameters_for(args, spec, entrypoint, state)
        if entrypoint != spec["entrypoint"]:
            spec.update(entrypoint=entrypoint, description=f"{entrypoint}, registered by `mgpo deploy`")
        pool = args.pool or (spec.get("work_pool") or {}).get("name") or "mgpo-process"
        spec["work_pool"] = {**(spec.get("work_pool") or {}), "name": pool}
        # Runs started by a worker get the stage cache of this state folder, whatever shell the worker runs in.
        job_env = spec["work_pool"].setdefault("job_variables", {}).setdefault("env", {})
        for key in ("PREFECT_LOCAL_STORAGE_PATH", "PREFECT_RESULTS_PERSIST_BY_DEFAULT"):
            job_env.setdefault(key, env[key])
        created = _ensure_process_pool(api, pool, env)
        out = servers_dir(state) / "deploy" / f"{args.name}.prefect.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        effective = {k: v for k, v in data.items() if k not in ("deployments", "definitions")}
        effective["deployments"] = [spec]
        out.write_text(yaml.dump(effective, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True))
        # Run from the repository root: the entrypoint resolves there and the recorded pull step points there.
        cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(out)]
        cmd += ["--name", args.name]
        p = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout)
        if p.returncode != 0:
            raise DeployError(
                f"`prefect deploy` failed (exit {p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
            )
    except DeployError as e:
        print(f"mgpo deploy: {e}", file=sys.stderr)
        return 2
    sched = spec["schedules"][0]
    print(f"deployment {args.name} ({spec['entrypoint']}) → {api}")
    print(f"schedule   cron {sched['cron']!r} ({sched['timezone']}), concurrency limit {_concurrency(spec)}")
    print(f"work pool  {pool}{' (created, type process)' if created else ''}")
    print(f"parameters {json.dumps(spec['parameters'])}")
    print(f"effective  {out}")
    print(
        f'runs need a worker: eval "$(mgpo servers env)"; prefect worker start --pool {pool}   (or: mgpo serve)'
    )
    return 0


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # a plain file reads better than anchors and aliases
        return True


def cmd_serve(args: argparse.Namespace) -> int:
    """Replace this process with a Prefect runner serving the deployment; Ctrl-C stops it (schedule paused)."""
    state = _default_state_dir(args)
    try:
        env, api = _prefect_env(state)
        _, spec = load_deployment_spec()
        cron, tz = _schedule(spec, args)
        entrypoint = args.entrypoint or spec["entrypoint"]
        params = _parameters_for(args, spec, entrypoint, state)
        if not SERVE_SCRIPT.is_file():
            raise DeployError(
                f"{SERVE_SCRIPT} is missing: `mgpo serve` needs a source checkout of the project"
            )
    except DeployError as e:
        print(f"mgpo serve: {e}", file=sys.stderr)
        return 2
    name = args.name or spec["name"]
    argv = [
        sys.executable, str(SERVE_SCRIPT), "--entrypoint", entrypoint, "--name", name,
        "--cron", cron, "--timezone", tz,
        "--params", json.dumps(params), "--limit", str(_concurrency(spec)),
    ]  # fmt: skip
    print(f"serving {entrypoint} as deployment {name!r} on {api}: cron {cron!r} ({tz})")
    print("Ctrl-C stops serving (the schedule is paused until served or deployed again)", flush=True)
    os.chdir(REPO_ROOT)  # entrypoints are relative to the repository root, and so is the served deployment
    os.execve(sys.executable, argv, env)
    return 0  # pragma: no cover - execve does not return


# ── registration in the `mgpo` command line ──────────────────────────────────────────────────────────────────


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "servers", help="start/stop/inspect local Prefect and MLflow servers (state under the state dir)"
    )
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--state-dir", default=None, help="state folder (default: the config's state_dir, .mgpo)")
    p.add_argument("--prefect-port", type=int, default=DEFAULT_PORTS["prefect"])
    p.add_argument("--mlflow-port", type=int, default=DEFAULT_PORTS["mlflow"])
    p.add_argument("--only", choices=SERVER_NAMES, default=None, help="start just one of the two servers")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for health (up) or exit (down)"
    )
    p.set_defaults(func=cmd_servers)

    for name, func, text in (
        (
            "deploy",
            cmd_deploy,
            "register the nightly deployment (cron, concurrency limit 1) on the Prefect server",
        ),
        ("serve", cmd_serve, "serve the nightly deployment from this process, executing its scheduled runs"),
    ):
        p = sub.add_parser(name, help=text)
        add_config_args(p)
        p.add_argument(
            "--cron", default=None, help="cron expression (default: the one in infra/prefect.yaml)"
        )
        p.add_argument(
            "--timezone", default=None, help="schedule time zone (default: infra/prefect.yaml, UTC)"
        )
        p.add_argument("--state-dir", default=None, help="state folder whose local servers to use")
        p.set_defaults(func=func)
        if name == "deploy":
            p.add_argument("--name", default=NIGHTLY, help="deployment name")
            p.add_argument(
                "--pool", default=None, help="work pool (default: infra/prefect.yaml; created if missing)"
            )
            p.add_argument("--timeout", type=float, default=600.0, help="seconds `prefect deploy` may take")
        else:
            p.add_argument("--name", default=None, help=f"deployment name (default {NIGHTLY})")
        p.add_argument(
            "--entrypoint",
            default=None,
            help="another flow, path:function relative to the repository (default flows/nightly.py:nightly)",
        )
