"""Authenticated servers and secrets kept secret, end to end (issue 26, items 1 and 5).

The shipped scale-out scripts (``infra/scale-out/servers/mlflow-server.sh``, ``prefect-server.sh``) start on
loopback with authentication on, their credentials in 0600 secret files, on SQLite instead of PostgreSQL (the
scripts take an explicit database URL). Unauthenticated and wrongly authenticated requests are refused; the
health endpoints the compose healthchecks probe stay open. The tiny pipeline then runs against both servers:
Prefect's auth string from ``PREFECT_API_AUTH_STRING``, MLflow's user and password inside the tracking URI as
``http://trainer:${MGPO_TEST_PASSWORD}@...`` (a secret-named variable). It must succeed, be recorded on both
servers, and leave no trace of any of the secrets in MLflow (the server's database and artifact store, the
parameters and tags read back), in the run folder (every file under the state folder except the 0600 config the
ranks load), in the stage logs, in Prefect's database, on the servers' command lines, or on the console.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_pipeline import SETS

from mgpo_core.ops.servers import free_port, group_alive, is_healthy, stop_process_group

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SCRIPTS = Path(__file__).resolve().parents[1] / "infra" / "scale-out" / "servers"
VENV_BIN = Path(sys.executable).parent
MAY_KEEP_SECRETS = {"launch-config.yaml"}
"""Files of the run folder that must hold the credential (the config the training ranks load); each is 0600."""


@dataclass
class AuthServers:
    mlflow: str
    prefect_api: str
    admin_password: str
    trainer_password: str
    auth_string: str
    root: Path
    pids: list[int]

    def secrets(self) -> dict[str, str]:
        return {"MLflow admin password": self.admin_password, "MLflow trainer password": self.trainer_password,
                "Prefect auth string": self.auth_string.partition(":")[2]}  # fmt: skip


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value)
    path.chmod(0o600)
    return path


def _status(
    url: str, *, method: str = "GET", auth: tuple[str, str] | None = None, body: bytes | None = None
) -> int:
    """HTTP status of one request (``auth`` as HTTP basic authentication)."""
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=20) as r:  # noqa: S310 - loopback test servers
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _start(script: str, env: dict[str, str], health: str, log: Path) -> int:
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(SCRIPTS / script)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    return proc.pid


def _wait_healthy(
    urls: dict[str, str], logs: dict[str, Path], pids: dict[str, int], timeout: float = 400
) -> None:
    import time

    deadline = time.monotonic() + timeout
    pending = dict(urls)
    while pending and time.monotonic() < deadline:
        for name, url in list(pending.items()):
            if is_healthy(url, timeout=2):
                del pending[name]
            elif not group_alive(pids[name]):
                raise AssertionError(f"{name} server exited:\n{logs[name].read_text()[-4000:]}")
        time.sleep(1)
    assert not pending, "not healthy: " + "; ".join(f"{n}: {logs[n].read_text()[-3000:]}" for n in pending)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[AuthServers]:
    root = tmp_path_factory.mktemp("auth-servers")
    keys = root / "secrets"
    keys.mkdir(mode=0o700)
    admin_pw, trainer_pw = secrets.token_hex(12), secrets.token_hex(12)
    auth_string = f"mgpo:{secrets.token_hex(12)}"
    ports = {"mlflow": free_port(), "prefect": free_port()}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MGPO_"))}
    base.update(PATH=f"{VENV_BIN}:{base.get('PATH', '/usr/bin:/bin')}", HOME=str(root))
    mlflow_env = {**base, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
                  "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{root / 'mlflow-auth.db'}",
                  "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"), "MLFLOW_WORKERS": "1",
                  "MLFLOW_PORT": str(ports["mlflow"]),
                  "MLFLOW_ADMIN_PASSWORD_FILE": str(_secret_file(keys / "mlflow_admin_password", admin_pw))}  # fmt: skip
    prefect_env = {**base, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
                   "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_PORT": str(ports["prefect"]),
                   "PREFECT_UI_ENABLED": "false",
                   "PREFECT_AUTH_STRING_FILE": str(_secret_file(keys / "prefect_auth_string", auth_string))}  # fmt: skip
    mlflow, prefect = f"http://127.0.0.1:{ports['mlflow']}", f"http://127.0.0.1:{ports['prefect']}/api"
    logs = {"mlflow": root / "mlflow.log", "prefect": root / "prefect.log"}
    pids = {"mlflow": _start("mlflow-server.sh", mlflow_env, f"{mlflow}/health", logs["mlflow"]),
            "prefect": _start("prefect-server.sh", prefect_env, f"{prefect}/health", logs["prefect"])}  # fmt: skip
    try:
        _wait_healthy({"mlflow": f"{mlflow}/health", "prefect": f"{prefect}/health"}, logs, pids)
        # The pipeline's own account (default permission READ; it owns what it creates), made by the admin.
        body = f'{{"username": "trainer", "password": "{trainer_pw}"}}'.encode()
        made = _status(
            f"{mlflow}/api/2.0/mlflow/users/create", method="POST", auth=("admin", admin_pw), body=body
        )
        assert made == 200, f"creating the trainer user answered {made}"
        yield AuthServers(mlflow, prefect, admin_pw, trainer_pw, auth_string, root, list(pids.values()))
    finally:
        for pid in pids.values():
            stop_process_group(pid, timeout=20)


def test_unauthenticated_requests_are_refused_and_health_stays_open(servers):
    s = servers
    search = f"{s.mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(search) == 401, "MLflow answered an anonymous API call"
    assert _status(search, auth=("admin", "wrong-password")) == 401
    assert _status(search, auth=("trainer", s.trainer_password)) == 200
    flows = f"{s.prefect_api}/flow_runs/filter"
    assert _status(flows, method="POST", body=b"{}") == 401, "Prefect answered an anonymous API call"
    assert _status(flows, method="POST", body=b"{}", auth=("mgpo", "wrong")) == 401
    assert _status(flows, method="POST", body=b"{}", auth=tuple(s.auth_string.split(":", 1))) == 200
    # The compose healthchecks (and `mgpo servers status`-style probes) need no credentials.
    assert _status(f"{s.mlflow}/health") == 200 and _status(f"{s.prefect_api}/health") == 200


def test_no_secret_on_the_servers_command_lines(servers):
    """``ps`` shows every user's command lines: the passwords reach the servers through files and variables."""
    seen = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(fields[2]) not in servers.pids:
                continue
            seen.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    assert any("mlflow" in c for c in seen) and any("prefect" in c for c in seen), seen
    for what, value in servers.secrets().items():
        assert not [c for c in seen if value in c], f"the {what} is on a server's command line"


@pytest.fixture(scope="module")
def authed_run(servers, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    state = tmp_path_factory.mktemp("authed-state")
    port = servers.mlflow.rpartition(":")[2]
    cmd = [sys.executable, "-m", "mgpo_cli", "run", "--preset", "tiny-cpu", "--set", f"state_dir={state}",
           "--set", f"tracking.mlflow_tracking_uri=http://trainer:${{MGPO_TEST_PASSWORD}}@127.0.0.1:{port}"]  # fmt: skip
    for s in SETS:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_", "MLFLOW_TRACKING"))}
    env.update(MGPO_TASK_RETRIES="0", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PREFECT_API_URL=servers.prefect_api, PREFECT_API_AUTH_STRING=servers.auth_string,
               MGPO_TEST_PASSWORD=servers.trainer_password)  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return state, p


def test_the_pipeline_runs_against_the_authenticated_servers(servers, authed_run, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    state, p = authed_run
    assert "MGPO pipeline finished" in p.stdout and "champion" in p.stdout
    # Recorded on the authenticated MLflow server (a client reading its credentials from the environment) ...
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", servers.trainer_password)
    client = MlflowClient(servers.mlflow)
    assert client.get_model_version_by_alias("mgpo-policy", "champion").version == "1"
    assert not (state / "mlflow.db").exists(), "nothing went to the serverless SQLite store"
    # ... and on the authenticated Prefect server.
    req = urllib.request.Request(f"{servers.prefect_api}/flow_runs/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Basic "
                                          + base64.b64encode(servers.auth_string.encode()).decode()})  # fmt: skip
    with urllib.request.urlopen(req, timeout=20) as r:  # noqa: S310 - loopback test server
        runs = json.loads(r.read())
    assert any(run["state_type"] == "COMPLETED" for run in runs), [run["state_type"] for run in runs]


def _files(root: Path) -> Iterator[Path]:
    return (f for f in root.rglob("*") if f.is_file() and not f.is_symlink())


def test_no_trace_of_any_secret_in_mlflow_the_run_folder_the_logs_or_the_console(
    servers, authed_run, monkeypatch
):
    from mlflow.tracking import MlflowClient

    state, p = authed_run
    found: list[str] = []
    kept: list[Path] = []
    for what, value in servers.secrets().items():
        needle = value.encode()
        if value in p.stdout + p.stderr:
            found.append(f"{what} on the console")
        # The run folder: stage logs, run manifests, config.yaml, checkpoints, Prefect's local storage.
        for f in _files(state):
            if needle in f.read_bytes():
                if f.name in MAY_KEEP_SECRETS:
                    kept.append(f)
                else:
                    found.append(f"{what} in {f.relative_to(state)}")
        # MLflow's database (params, tags, run and model metadata) and artifact store; Prefect's database
        # (flow-run parameters, logs, artifacts, events).
        for name in ("mlflow.db", "artifacts", "prefect.db"):
            base = servers.root / name
            for f in [base] if base.is_file() else _files(base):
                if needle in f.read_bytes():
                    found.append(f"{what} in the server's {f.relative_to(servers.root)}")
    assert not found, found
    for f in kept:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f} keeps the credential but is not 0600"

    # Read back through MLflow's API as a user sees it: the parameters name the tracking URI, masked.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", servers.trainer_password)
    client = MlflowClient(servers.mlflow)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs, "the pipeline logged runs on the server"
    uris = {r.data.params.get("tracking.mlflow_tracking_uri") for r in runs} - {None}
    assert uris and all("***@127.0.0.1" in u for u in uris), uris
    for r in runs:
        text = " ".join([*r.data.params.values(), *r.data.tags.values()])
        assert servers.trainer_password not in text and "trainer:" not in text
