"""Retries only where a retry can help: the classifier on real failures (MLflow store and client, a socket, a
training launch) and a Prefect task run under the stage tasks' retry policy, counting its attempts."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mgpo_core.training.launch import TrainingFailed, free_port
from tasks.retry import classify


def _raised(fn):  # noqa: ANN001, ANN202
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("expected an exception")


@pytest.fixture()
def no_http_retries(monkeypatch):
    # MLflow's own HTTP retries (7 with back-off) would hide the first answer.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def test_a_missing_model_version_is_never_retried(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model("m")
    v = classify(_raised(lambda: client.get_model_version("m", "1")))
    assert not v.retry and "RESOURCE_DOES_NOT_EXIST" in v.reason


def test_configuration_data_and_validation_errors_are_never_retried(tmp_path):
    from mgpo_core.config import ConfigError, load_config
    from mgpo_core.modeling.loading import resolve_model_path

    assert isinstance(_raised(lambda: load_config("tiny-cpu", ["rollout.n=-1"])), ConfigError)
    for exc in (
        _raised(lambda: load_config("tiny-cpu", ["rollout.n=-1"])),
        _raised(lambda: resolve_model_path(tmp_path / "nope", cache_root=tmp_path)),
        _raised(lambda: open(tmp_path / "missing.jsonl")),
        _raised(lambda: int("x")),
    ):
        assert not classify(exc).retry, (type(exc).__name__, classify(exc))


def test_connection_refused_is_retried(no_http_retries):
    from mlflow.tracking import MlflowClient

    exc = _raised(lambda: MlflowClient(f"http://127.0.0.1:{free_port()}").search_experiments())
    v = classify(exc)
    assert v.retry, (repr(exc)[:300], v)


@pytest.mark.parametrize("status", [503, 429, 404])
def test_http_answers_5xx_and_429_are_retried_4xx_are_not(status, no_http_retries):
    """An overloaded proxy in front of the tracking server answers with a bare status line."""
    from mlflow.tracking import MlflowClient

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(status)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"busy")

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        exc = _raised(lambda: MlflowClient(f"http://127.0.0.1:{srv.server_port}").search_experiments())
    finally:
        srv.shutdown()
    assert classify(exc).retry is (status != 404), (repr(exc)[:300], classify(exc))


def test_a_killed_training_process_is_retried_a_failed_one_is_not(tmp_path):
    killed = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert classify(TrainingFailed(killed.returncode, "", tmp_path)).retry
    torchrun_tail = (
        "exitcode  : -9 (pid: 123)\nerror_file: <N/A>\ntraceback : Signal 9 (SIGKILL) received by PID 123"
    )
    assert classify(TrainingFailed(1, torchrun_tail, tmp_path)).retry
    crashed = subprocess.run([sys.executable, "-c", "raise ValueError('bad batch')"], capture_output=True)
    assert not classify(TrainingFailed(crashed.returncode, crashed.stderr.decode(), tmp_path)).retry


def test_a_failed_training_is_reported_with_its_cause_not_a_dangling_log_header(tmp_path):
    from tasks.console import Console, failure_paragraph

    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; print('[rank0]: x = 1', file=sys.stderr); raise ValueError('bad batch')",
        ],
        capture_output=True,
        text=True,
    )
    tail = "\n".join(f"[rank0]: {line}" for line in crashed.stderr.splitlines())
    text = failure_paragraph(
        Console(tmp_path), TrainingFailed(crashed.returncode, tail, tmp_path), "mgpo run"
    )
    lines = text.strip().splitlines()
    assert lines[0].endswith("resumes from the last checkpoint).") and "Last log lines" not in text, text
    assert lines[1] == "  cause: ValueError: bad batch", text
    # no cause line when the log names none
    plain = failure_paragraph(Console(tmp_path), TrainingFailed(-9, "Killed", tmp_path), "mgpo run")
    assert "cause:" not in plain and len(plain.strip().splitlines()) == 3


_FLOW = """
import json, sys
from pathlib import Path
from prefect import flow, task
from mlflow.tracking import MlflowClient
from tasks.stages import RETRY

counts = Path(sys.argv[1])

def bump(name):
    data = json.loads(counts.read_text()) if counts.exists() else {}
    data[name] = data.get(name, 0) + 1
    counts.write_text(json.dumps(data))

@task(name="flaky-connection", **RETRY)
def flaky():
    bump("connection")
    raise ConnectionResetError("connection reset by peer")

@task(name="missing-version", **RETRY)
def missing():
    bump("not_found")
    MlflowClient(f"sqlite:///{counts.parent}/mlflow.db").get_model_version("nothing", "1")

@flow
def both():
    for t in (flaky, missing):
        try:
            t()
        except Exception as e:
            print("FAILED", t.name, type(e).__name__)

both()
"""


@pytest.mark.slow
def test_stage_retry_policy_retries_a_connection_error_twice_and_a_missing_version_never(tmp_path):
    script = tmp_path / "flow.py"
    script.write_text(_FLOW)
    counts = tmp_path / "counts.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        MGPO_TASK_RETRY_DELAYS="0,0",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    p = subprocess.run(
        [sys.executable, str(script), str(counts)], env=env, capture_output=True, text=True, timeout=300
    )
    import json

    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(counts.read_text()) == {"connection": 3, "not_found": 1}, p.stderr[-3000:]
    assert "not retried" in p.stderr + p.stdout and "will retry" in p.stderr + p.stdout
