"""One Prefect history per state folder: a run made with the ephemeral API (no server yet) is in the UI of the
server ``mgpo servers up`` starts afterwards — the README's own order (run, then servers up).

The run is a real ``mgpo run`` whose filter stage fails at once (a stage hook), so no training is needed: Prefect
still records the nightly flow run and its failed task run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    tests_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
    return env


def _post(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - the loopback server this test started
        return json.loads(r.read())


def test_a_run_before_servers_up_is_in_the_servers_ui(tmp_path: Path) -> None:
    from mgpo_core.ops.servers import free_port, read_records, stop_process_group, stop_servers

    state = tmp_path / "state"
    env = {**_env(), "MGPO_STAGE_HOOKS": "stage_hooks:fail_stage", "MGPO_FAIL_STAGE": "filter",
           "MGPO_TASK_RETRIES": "0"}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "mgpo_cli", "run", "--preset", "tiny-cpu", "--set", f"state_dir={state}"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode != 0 and "injected failure in stage 'filter'" in run.stderr, run.stdout + run.stderr
    assert not (state / "prefect" / "prefect.db").exists(), "the ephemeral API wrote a database of its own"

    port = free_port()
    up = subprocess.run(
        [sys.executable, "-m", "mgpo_cli", "servers", "up", "--only", "prefect", "--state-dir", str(state),
         "--prefect-port", str(port), "--timeout", "300"],
        env=_env(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    pids = [r.pid for r in read_records(state).values()]
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api = f"http://127.0.0.1:{port}/api"
        flows = {f["id"]: f["name"] for f in _post(f"{api}/flows/filter", {})}
        runs = [r for r in _post(f"{api}/flow_runs/filter", {}) if flows.get(r["flow_id"]) == "mgpo-nightly"]
        assert len(runs) == 1, f"the server's UI lists {len(runs)} nightly runs: {runs}"
        assert runs[0]["state_type"] == "FAILED"
        tasks = _post(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
        assert any(t["task_key"].startswith("filter") or t["name"].startswith("filter") for t in tasks), tasks
    finally:
        stop_servers(state, timeout=20)
        for pid in pids:
            stop_process_group(pid, timeout=5)
