"""Local Prefect and MLflow servers: ``mgpo servers up|down|status``, health probes, the Prefect environment.

The integration tests start real servers once for the module (through the ``mgpo`` command, as a user would)
on free ports under a temporary state folder and always stop them again, with a SIGKILL fallback. The unit tests
use short-lived stand-in processes to check refusals, stale records, error messages and group kills.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from mgpo_core.ops.servers import (
    Endpoints,
    ServerRecord,
    ServersError,
    _write_records,
    active_endpoints,
    apply_prefect_env,
    free_port,
    group_alive,
    port_is_free,
    read_records,
    record_path,
    running_servers,
    start_servers,
    stop_process_group,
    stop_servers,
    wait_until_healthy,
)


def mgpo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "mgpo_cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def kill_groups(pids: list[int]) -> None:
    """Finalizer fallback: whatever survived a clean stop is killed."""
    for pid in pids:
        if group_alive(pid):
            stop_process_group(pid, timeout=5.0)


def http_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


# ── unit tests: no real servers ─────────────────────────────────────────────────────────────────────────────


def test_active_endpoints_are_none_without_a_record(tmp_path):
    assert active_endpoints(tmp_path) == Endpoints(prefect_api_url=None, mlflow_uri=None)
    assert running_servers(tmp_path) == {}


def test_prefect_env_without_server_keeps_the_ephemeral_api_state_in_the_project_folder(tmp_path):
    env: dict[str, str] = {}
    applied = apply_prefect_env(tmp_path, env)
    assert "PREFECT_API_URL" not in env
    assert env["PREFECT_HOME"] == str(tmp_path.resolve() / "prefect")
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path.resolve() / "prefect" / "storage")
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert Path(env["PREFECT_LOCAL_STORAGE_PATH"]).is_dir()
    assert applied == env


def test_prefect_env_keeps_settings_the_user_exported(tmp_path):
    env = {"PREFECT_HOME": "/elsewhere/prefect", "PREFECT_API_URL": "http://prod:4200/api"}
    applied = apply_prefect_env(tmp_path, env)
    assert env["PREFECT_HOME"] == "/elsewhere/prefect" and env["PREFECT_API_URL"] == "http://prod:4200/api"
    assert "PREFECT_HOME" not in applied and "PREFECT_API_URL" not in applied
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"


def test_unknown_server_name_is_rejected(tmp_path):
    with pytest.raises(ServersError, match="unknown server 'redis'"):
        start_servers(tmp_path, only=["redis"])


def test_port_in_use_is_refused_with_the_flag_that_changes_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not port_is_free(port)
        with pytest.raises(ServersError, match=rf"port {port} .*in use.*--prefect-port"):
            start_servers(tmp_path, ports={"prefect": port}, only=["prefect"])
    assert not record_path(tmp_path).exists()


def test_stale_record_counts_as_not_running_and_down_clears_it(tmp_path):
    dead = subprocess.Popen(["true"], start_new_session=True)
    dead.wait()
    port = free_port()
    rec = ServerRecord("prefect", f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}/api/health", port,
                       dead.pid, str(tmp_path / "p.log"), f"http://127.0.0.1:{port}")  # fmt: skip
    _write_records(tmp_path, {"prefect": rec})
    assert read_records(tmp_path)["prefect"].pid == dead.pid
    assert running_servers(tmp_path) == {}
    assert active_endpoints(tmp_path).prefect_api_url is None
    assert stop_servers(tmp_path) == {"prefect": "not running"}
    assert not record_path(tmp_path).exists()
    assert not (tmp_path / "servers" / "prefect.pid").exists()


def test_down_leaves_an_unrelated_process_that_reused_the_pid_alone(tmp_path):
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        rec = ServerRecord(
            "mlflow", "http://127.0.0.1:9/", "http://127.0.0.1:9/health", 9, other.pid, "x", "x"
        )
        _write_records(tmp_path, {"mlflow": rec})
        assert stop_servers(tmp_path) == {"mlflow": "not running"}
        assert other.poll() is None, "stop_servers killed a process that is not an MLflow server"
    finally:
        other.kill()
        other.wait()


def test_server_that_dies_at_start_is_reported_with_its_exit_code_and_log_tail(tmp_path):
    log = tmp_path / "mlflow.log"
    with log.open("w") as out:
        code = "print('boom: backend store unreadable', flush=True); raise SystemExit(3)"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    port = free_port()
    rec = ServerRecord("mlflow", "u", f"http://127.0.0.1:{port}/health", port, proc.pid, str(log), "u")
    with pytest.raises(ServersError, match=r"(?s)exited with code 3.*boom: backend store unreadable"):
        wait_until_healthy({"mlflow": (proc, rec)}, timeout=60)


def test_server_that_never_answers_times_out_naming_the_url(tmp_path):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    port = free_port()
    rec = ServerRecord(
        "prefect", "u", f"http://127.0.0.1:{port}/api/health", port, proc.pid, str(tmp_path / "l"), "u"
    )
    try:
        with pytest.raises(
            ServersError, match=rf"did not answer http://127.0.0.1:{port}/api/health within 1 s"
        ):
            wait_until_healthy({"prefect": (proc, rec)}, timeout=1.0)
    finally:
        proc.kill()
        proc.wait()


def test_stopping_a_group_that_ignores_sigterm_kills_it_and_its_children(tmp_path):
    ready = tmp_path / "ready"
    code = (
        "import signal, subprocess, pathlib, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"pathlib.Path({str(ready)!r}).write_text(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        child_pid = int(ready.read_text())
        assert group_alive(proc.pid)
        # SIGTERM is ignored, so only the escalation to SIGKILL can end the group (no wall-clock bound needed).
        assert stop_process_group(proc.pid, timeout=1.0) is True
        assert not group_alive(proc.pid)
        assert not Path(f"/proc/{child_pid}").exists() or "Z" in Path(f"/proc/{child_pid}/stat").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ── integration: real servers, started once for the module ───────────────────────────────────────────────


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    state = tmp_path_factory.mktemp("servers-state")
    ports = {"prefect": free_port(), "mlflow": free_port()}
    pids: list[int] = []
    try:
        up = mgpo(
            "servers", "up", "--state-dir", str(state),
            "--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"]),
            "--timeout", "300",  # a loaded 2-core CI machine has needed more than the default 120 s
            timeout=400,
        )  # fmt: skip
        pids += [r.pid for r in read_records(state).values()]
        assert up.returncode == 0, f"mgpo servers up failed:\n{up.stdout}\n{up.stderr}"
        yield SimpleNamespace(state=state, ports=ports, up=up, records=read_records(state))
    finally:
        stop_servers(state, timeout=10.0)
        kill_groups(pids)


@pytest.mark.slow
def test_up_starts_both_servers_healthy_with_all_state_in_the_state_folder(servers):
    recs = servers.records
    assert set(recs) == {"prefect", "mlflow"}
    root = servers.state / "servers"
    saved = json.loads((root / "servers.json").read_text())
    for name, rec in recs.items():
        assert rec.port == servers.ports[name]
        assert rec.url.startswith(f"http://127.0.0.1:{rec.port}")
        assert group_alive(rec.pid)
        assert int((root / f"{name}.pid").read_text()) == rec.pid == saved["servers"][name]["pid"]
        assert rec.url in servers.up.stdout
        with urllib.request.urlopen(rec.health_url, timeout=5) as r:
            assert r.status == 200
        assert Path(rec.log).is_file() and Path(rec.log).is_relative_to(root)
    assert (root / "prefect" / "prefect.db").is_file()
    # One system of record: the MLflow server serves the store the serverless mode uses.
    assert (servers.state / "mlflow.db").is_file() and not (root / "mlflow" / "mlflow.db").exists()


@pytest.mark.slow
def test_mlflow_server_serves_the_serverless_store_runs_and_artifacts(servers):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(servers.records["mlflow"].url)
    exp = client.create_experiment("servers-test")
    run = client.create_run(exp, run_name="probe")
    client.log_param(run.info.run_id, "lr", "0.1")
    for step, v in enumerate([0.5, 0.25]):
        client.log_metric(run.info.run_id, "loss/policy", v, step=step)
    client.log_text(run.info.run_id, "stored artifact", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"lr": "0.1"}
    assert got.data.metrics["loss/policy"] == 0.25 and got.info.status == "FINISHED"
    stored = list((servers.state / "mlartifacts").rglob("hello.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "stored artifact"
    # ... and what the server wrote, the serverless store reads (and the other way round).
    local = MlflowClient(f"sqlite:///{servers.state / 'mlflow.db'}")
    assert local.get_run(run.info.run_id).data.metrics["loss/policy"] == 0.25
    offline = local.create_run(exp, run_name="serverless").info.run_id
    assert client.get_run(offline).info.run_name == "serverless"


@pytest.mark.slow
def test_prefect_server_api_answers_and_persists_objects(servers):
    api = servers.records["prefect"].url
    assert http_json(f"{api}/health") is True
    created = http_json(f"{api}/flows/", {"name": "servers-probe-flow"})
    found = http_json(f"{api}/flows/filter", {"flows": {"name": {"any_": ["servers-probe-flow"]}}})
    assert [f["id"] for f in found] == [created["id"]]


@pytest.mark.slow
def test_active_endpoints_and_prefect_env_point_at_the_running_servers(servers):
    recs = servers.records
    assert active_endpoints(servers.state) == Endpoints(recs["prefect"].url, recs["mlflow"].url)
    env: dict[str, str] = {}
    apply_prefect_env(servers.state, env)
    assert env["PREFECT_API_URL"] == recs["prefect"].url
    assert env["PREFECT_LOCAL_STORAGE_PATH"].startswith(str(servers.state.resolve()))


@pytest.mark.slow
def test_status_lists_urls_and_health(servers):
    p = mgpo("servers", "status", "--state-dir", str(servers.state), timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for rec in servers.records.values():
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith(rec.name))
        assert rec.url in line and str(rec.pid) in line and line.endswith("healthy")


@pytest.mark.slow
def test_second_up_refuses_and_names_the_running_servers(servers):
    p = mgpo(
        "servers", "up", "--state-dir", str(servers.state),
        "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()), timeout=60,
    )  # fmt: skip
    assert p.returncode == 1
    assert "already running" in p.stderr and "mgpo servers down" in p.stderr
    for rec in servers.records.values():
        assert rec.ui_url in p.stderr and f"pid {rec.pid}" in p.stderr
    assert {n: r.pid for n, r in read_records(servers.state).items()} == {
        n: r.pid for n, r in servers.records.items()
    }
    assert active_endpoints(servers.state).mlflow_uri == servers.records["mlflow"].url


@pytest.mark.slow
def test_down_stops_both_frees_the_ports_and_removes_the_record(servers):
    p = mgpo("servers", "down", "--state-dir", str(servers.state), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for rec in servers.records.values():
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith(rec.name))
        assert line.split()[-1] in ("stopped", "killed"), line
        assert not group_alive(rec.pid), f"{rec.name} (pgid {rec.pid}) still has live processes"
        assert port_is_free(rec.port)
        assert not (servers.state / "servers" / f"{rec.name}.pid").exists()
    assert not record_path(servers.state).exists()
    assert active_endpoints(servers.state) == Endpoints(None, None)
    status = mgpo("servers", "status", "--state-dir", str(servers.state), timeout=60)
    assert status.returncode == 3 and "mgpo servers up" in status.stdout
