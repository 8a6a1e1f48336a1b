"""Local Prefect and MLflow servers on 127.0.0.1 with all state under ``<state_dir>/servers/``: start, stop, probe.

Each server runs in its own session (process group) so it outlives the command that started it, and stopping it
signals the whole group (SIGTERM, wait, SIGKILL). ``servers.json`` records URLs, ports, pids and log files.
This module never imports Prefect: ``apply_prefect_env`` only prepares the environment Prefect reads at import.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path

SERVER_NAMES: tuple[str, ...] = ("prefect", "mlflow")
DEFAULT_PORTS: dict[str, int] = {"prefect": 4200, "mlflow": 5000}
HOST = "127.0.0.1"


class ServersError(RuntimeError):
    """A server could not be started, is already running, or a port is taken; the message says what to do."""


@dataclass(frozen=True)
class Endpoints:
    """URLs of the local servers that answer their health checks right now (None = not running)."""

    prefect_api_url: str | None
    mlflow_uri: str | None


@dataclass(frozen=True)
class ServerRecord:
    """One started server as written to ``servers.json``; ``pid`` is also its process-group id."""

    name: str
    url: str
    health_url: str
    port: int
    pid: int
    log: str
    ui_url: str


def mlflow_store_paths(state_dir: str | Path) -> tuple[Path, Path]:
    """(SQLite database, artifact folder) of the state folder's MLflow store, used with and without the server."""
    state = Path(state_dir).resolve()
    return state / "mlflow.db", state / "mlartifacts"


def servers_dir(state_dir: str | Path) -> Path:
    return Path(state_dir).resolve() / "servers"


def prefect_database_url(state_dir: str | Path) -> str:
    """The state folder's one Prefect database: the local server's, and the ephemeral API's when no server runs,
    so runs made before ``mgpo servers up`` are in its UI (one history, as MLflow has one store)."""
    return f"sqlite+aiosqlite:///{servers_dir(state_dir) / 'prefect' / 'prefect.db'}"


def record_path(state_dir: str | Path) -> Path:
    return servers_dir(state_dir) / "servers.json"


def read_records(state_dir: str | Path) -> dict[str, ServerRecord]:
    """The servers recorded by the last ``start_servers`` (empty when none or the record is unreadable)."""
    try:
        raw = json.loads(record_path(state_dir).read_text())
        return {name: ServerRecord(**rec) for name, rec in raw.get("servers", {}).items()}
    except (OSError, ValueError, TypeError):
        return {}


def _write_records(state_dir: str | Path, records: dict[str, ServerRecord]) -> None:
    root = servers_dir(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dir": str(Path(state_dir).resolve()),
        "written_at": dt.datetime.now(dt.UTC).isoformat(),
        "servers": {name: asdict(rec) for name, rec in records.items()},
    }
    tmp = root / "servers.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(record_path(state_dir))  # readers never see a half-written record
    for name, rec in records.items():
        (root / f"{name}.pid").write_text(f"{rec.pid}\n")


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200 within ``timeout`` seconds (any failure means "not now")."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URLs we recorded
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def port_is_free(port: int, host: str = HOST) -> bool:
    """Can a server bind ``host:port`` now? (SO_REUSEADDR as uvicorn sets it, so TIME_WAIT does not count.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """A port the kernel considers free right now (for tests and ``--prefect-port 0``-style callers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ── processes ────────────────────────────────────────────────────────────────────────────────────────────────


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process-group id) of ``pid`` from /proc, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[2])


def group_alive(pgid: int) -> bool:
    """Does any non-zombie process remain in process group ``pgid``?

    Zombies are excluded because a killed server whose parent never reaps it (an init that does not wait, or the
    test process that started it) would otherwise look alive forever.
    """
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap our own child if we started it in this process
    except ChildProcessError:
        pass
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None and st[1] == pgid and st[0] != "Z":
                return True
    return False


def _is_our_server(rec: ServerRecord) -> bool:
    """The recorded pid still leads its own group and runs that server (guards against pid reuse)."""
    if not Path("/proc").is_dir():  # no /proc (macOS): trust the record
        return group_alive(rec.pid)
    st = _proc_stat(rec.pid)
    if st is None or st[1] != rec.pid:
        return False
    if st[0] == "Z":  # a dead leader keeps its pid reserved, so live members of its group are still ours
        return group_alive(rec.pid)
    try:
        cmdline = Path(f"/proc/{rec.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return rec.name in cmdline


def stop_process_group(pgid: int, timeout: float = 15.0) -> bool:
    """SIGTERM the whole group, wait up to ``timeout`` s, then SIGKILL; True if it had to be killed.

    Servers and ``serve`` processes are known to ignore SIGTERM in some states (a ``serve`` whose API died), so
    the kill fallback is not optional.
    """
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return sig == signal.SIGKILL
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return sig == signal.SIGKILL
            time.sleep(0.1)
    return True


def _log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


# ── the two servers ──────────────────────────────────────────────────────────────────────────────────────────


def _clean_env() -> dict[str, str]:
    # A server must not inherit a client's pointer to some other API or database.
    drop = ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    return env


def server_command(
    name: str, state_dir: str | Path, port: int, mlflow_workers: int = 1
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of one server, every state file under ``<state_dir>/servers/<name>/``."""
    root = servers_dir(state_dir) / name
    env = _clean_env()
    if name == "prefect":
        home = root
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=prefect_database_url(state_dir),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",  # its telemetry row races SQLite at start-up
            # The UI builds its API address from these settings, not from --port.
            PREFECT_SERVER_API_HOST=HOST,
            PREFECT_SERVER_API_PORT=str(port),
        )
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
        return argv, env
    if name == "mlflow":
        # Its job runner (GenAI judges) forks ~8 consumer processes: dead weight for this pipeline on 2 cores.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        # One system of record: the server serves THE store the serverless mode writes (<state>/mlflow.db,
        # artifacts in <state>/mlartifacts), so runs, models and aliases of both modes are in one UI and a
        # cached stage result points into the same store whether or not the server runs.
        store, artifacts = mlflow_store_paths(state_dir)
        argv = [
            sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{store}",
            "--default-artifact-root", artifacts.as_uri(),
            "--artifacts-destination", str(artifacts), "--serve-artifacts",
            "--workers", str(mlflow_workers),  # more workers only contend for 2 cores and one SQLite file
        ]  # fmt: skip
        return argv, env
    raise ValueError(f"unknown server {name!r}; expected one of {SERVER_NAMES}")


def _urls(name: str, port: int) -> tuple[str, str, str]:
    """(client URL, health URL, UI URL)."""
    base = f"http://{HOST}:{port}"
    if name == "prefect":
        return f"{base}/api", f"{base}/api/health", base
    return base, f"{base}/health", base


def _launch(name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        # start_new_session: its own process group, so it survives our exit and `down` can kill every child.
        return subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=log.parent,
        )  # fmt: skip


def wait_until_healthy(procs: dict[str, tuple[subprocess.Popen, ServerRecord]], timeout: float) -> None:
    """Poll every server's health URL until all answer; raise ``ServersError`` with the log tail otherwise."""
    pending = dict(procs)
    deadline = time.monotonic() + timeout
    while pending:
        for name, (proc, rec) in list(pending.items()):
            if is_healthy(rec.health_url, timeout=1.0):
                del pending[name]
            elif proc.poll() is not None:
                raise ServersError(
                    f"the {name} server exited with code {proc.returncode} before answering {rec.health_url}.\n"
                    f"last lines of {rec.log}:\n{_log_tail(rec.log)}"
                )
        if pending and time.monotonic() > deadline:
            name, (_, rec) = next(iter(pending.items()))
            raise ServersError(
                f"the {name} server did not answer {rec.health_url} within {timeout:.0f} s "
                f"(raise --timeout on a loaded machine).\nlast lines of {rec.log}:\n{_log_tail(rec.log)}"
            )
        if pending:
            time.sleep(0.5)


def running_servers(state_dir: str | Path) -> dict[str, ServerRecord]:
    """Recorded servers whose process group is still alive (healthy or not)."""
    return {n: r for n, r in read_records(state_dir).items() if _is_our_server(r) and group_alive(r.pid)}


def start_servers(
    state_dir: str | Path,
    *,
    ports: dict[str, int] | None = None,
    only: Iterable[str] | None = None,
    timeout: float = 120.0,
    mlflow_workers: int = 1,
) -> dict[str, ServerRecord]:
    """Start the Prefect and/or MLflow server on 127.0.0.1 and wait until both answer their health checks.

    Refuses (``ServersError``) when servers recorded under this state folder still run, or when a port is taken.
    On any start-up failure every server started here is stopped again, so nothing is left half-running.
    """
    names = tuple(only or SERVER_NAMES)
    for n in names:
        if n not in SERVER_NAMES:
            raise ServersError(f"unknown server {n!r}; choose from {', '.join(SERVER_NAMES)}")
    running = running_servers(state_dir)
    if running:
        listing = "; ".join(f"{r.name} at {r.ui_url} (pid {r.pid})" for r in running.values())
        raise ServersError(
            f"servers already running for {servers_dir(state_dir)}: {listing}. "
            "Use them as they are, or stop them first with `mgpo servers down`."
        )
    _forget(state_dir, SERVER_NAMES)  # whatever is recorded is stale: nothing of it runs
    chosen = {n: (ports or {}).get(n) or DEFAULT_PORTS[n] for n in names}
    for n, port in chosen.items():
        if not port_is_free(port):
            raise ServersError(
                f"port {port} on {HOST} (for the {n} server) is already in use by another process; "
                f"choose another with --{n}-port PORT."
            )
    logs = servers_dir(state_dir) / "logs"
    procs: dict[str, tuple[subprocess.Popen, ServerRecord]] = {}
    try:
        for n, port in chosen.items():
            argv, env = server_command(n, state_dir, port, mlflow_workers=mlflow_workers)
            (servers_dir(state_dir) / n).mkdir(parents=True, exist_ok=True)
            log = logs / f"{n}.log"
            proc = _launch(n, argv, env, log)
            url, health, ui = _urls(n, port)
            procs[n] = (proc, ServerRecord(n, url, health, port, proc.pid, str(log), ui))
            # Recorded at once, so `mgpo servers down` can clean up even if this command is interrupted.
            _write_records(state_dir, {k: rec for k, (_, rec) in procs.items()})
        wait_until_healthy(procs, timeout)
    except BaseException:
        for _, rec in procs.values():
            stop_process_group(rec.pid, timeout=10.0)
        _forget(state_dir, procs)
        raise
    return {n: rec for n, (_, rec) in procs.items()}


def _forget(state_dir: str | Path, names: Iterable[str]) -> None:
    root = servers_dir(state_dir)
    for n in names:
        (root / f"{n}.pid").unlink(missing_ok=True)
    record_path(state_dir).unlink(missing_ok=True)


def stop_servers(state_dir: str | Path, timeout: float = 20.0) -> dict[str, str]:
    """Stop every recorded server (whole process group, SIGKILL fallback) and remove the pid record.

    Returns ``{name: "stopped" | "killed" | "not running"}``; a recorded pid now used by some unrelated process
    is left alone and reported "not running".
    """
    outcome: dict[str, str] = {}
    records = read_records(state_dir)
    for name, rec in records.items():
        if _is_our_server(rec) and group_alive(rec.pid):
            outcome[name] = "killed" if stop_process_group(rec.pid, timeout=timeout) else "stopped"
        else:
            outcome[name] = "not running"
    _forget(state_dir, [*records, *SERVER_NAMES])
    return outcome


def active_endpoints(state_dir: str | Path, timeout: float = 2.0) -> Endpoints:
    """URLs of the recorded local servers that answer their health checks now; None for the others.

    Prefect is probed at ``<url>/api/health``, MLflow at ``<url>/health``. The pipeline uses these when they run
    and falls back to the ephemeral Prefect API and the SQLite MLflow store otherwise.
    """
    recs = read_records(state_dir)
    found = {n: r.url for n, r in recs.items() if is_healthy(r.health_url, timeout=timeout)}
    return Endpoints(prefect_api_url=found.get("prefect"), mlflow_uri=found.get("mlflow"))


def apply_prefect_env(
    state_dir: str | Path, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Point Prefect at the local server when it runs, else keep the ephemeral API's state in the project folder.

    Sets ``PREFECT_API_URL`` (local server healthy) — or, without it, leaves the API ephemeral with
    ``PREFECT_HOME=<state_dir>/prefect`` so its SQLite database is not written under the user's home — plus
    ``PREFECT_LOCAL_STORAGE_PATH=<state_dir>/prefect/storage`` and ``PREFECT_RESULTS_PERSIST_BY_DEFAULT=true``
    (stage caching needs persisted results). Variables already set in ``environ`` are kept: an explicit
    ``PREFECT_API_URL`` (say, a production server) wins over the local one.

    Must run BEFORE ``prefect`` is imported in this process: Prefect reads its settings once, at import.
    Returns the variables it set.
    """
    env = os.environ if environ is None else environ
    prefect_root = Path(state_dir).resolve() / "prefect"
    storage = prefect_root / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    wanted = {
        "PREFECT_HOME": str(prefect_root),
        "PREFECT_LOCAL_STORAGE_PATH": str(storage),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    url = active_endpoints(state_dir).prefect_api_url
    if url:
        wanted["PREFECT_API_URL"] = url
    else:  # the ephemeral API writes the database the local server serves
        (servers_dir(state_dir) / "prefect").mkdir(parents=True, exist_ok=True)
        wanted["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = prefect_database_url(state_dir)
    applied = {k: v for k, v in wanted.items() if not env.get(k)}
    env.update(applied)
    return applied
