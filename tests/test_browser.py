"""The UIs a user opens after a pipeline run, seen by a real headless Chromium: MLflow's model registry page shows
``mgpo-policy`` with its ``champion`` alias, and Prefect's runs pages show the completed ``mgpo-nightly`` flow run.

Set-up as a user does it: ``mgpo servers up`` on free loopback ports, then ``mgpo run`` (small) which finds the
running servers by itself. The browser is Debian's ``chromium`` (``bash infra/system_deps.sh`` installs it); no
browser is downloaded. Screenshots of each page are kept under the test's temp folder for a human to look at.
"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_pipeline import SETS as PIPELINE_SETS

from mgpo_core.ops.servers import free_port, group_alive, read_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "headless Chromium missing (/usr/bin/chromium): run bash infra/system_deps.sh",
        allow_module_level=True,
    )

# The flags that work in a root container without a display, a GPU or network (see ENVIRONMENT.md).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    "--hide-scrollbars", "--window-size=1400,900",
    # Without it a screenshot can catch the SPA mid-transition (a faded skeleton) although the DOM is complete.
    "--run-all-compositor-stages-before-draw",
]  # fmt: skip

# The small pipeline of tests/test_pipeline.py: two RL steps on four synthetic samples.
SETS = PIPELINE_SETS
MODEL = "mgpo-policy"


def base_env(home: Path) -> dict[str, str]:
    # A developer's own PREFECT_API_URL / MLFLOW_TRACKING_URI must not leak into the servers or the pipeline.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_", "MLFLOW_"))}
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HOME=str(home)
    )
    return env


def mgpo(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mgpo_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class Stack:
    """Servers started under ``state`` and one finished pipeline run against them."""

    state: Path
    prefect_api: str
    prefect_ui: str
    mlflow: str
    shots: Path
    run_stdout: str


def stop(state: Path, env: dict[str, str]) -> None:
    """``mgpo servers down``; whatever survives it (or a hung ``down``) is SIGKILLed by its process group."""
    records = read_records(state)
    try:
        mgpo("servers", "down", "--state-dir", str(state), "--timeout", "20", env=env, timeout=90)
    except subprocess.TimeoutExpired:
        pass
    for rec in records.values():
        if group_alive(rec.pid):
            try:
                os.killpg(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("browser")
    state, shots = root / "state", root / "screenshots"
    shots.mkdir()
    env = base_env(root)
    pp, mp = free_port(), free_port()
    up = mgpo(
        "servers",
        "up",
        "--state-dir",
        str(state),
        "--prefect-port",
        str(pp),
        "--mlflow-port",
        str(mp),
        "--timeout",
        "240",
        env=env,
        timeout=300,
    )
    try:
        assert up.returncode == 0, f"mgpo servers up failed:\n{up.stdout}\n{up.stderr}"
        run_env = {**env, "MGPO_TASK_RETRIES": "0"}
        sets = [a for s in SETS for a in ("--set", s)]
        run = mgpo("run", "--preset", "tiny-cpu", "--set", f"state_dir={state}", *sets, env=run_env, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        yield Stack(
            state,
            f"http://127.0.0.1:{pp}/api",
            f"http://127.0.0.1:{pp}",
            f"http://127.0.0.1:{mp}",
            shots,
            run.stdout,
        )
    finally:
        stop(state, env)


def chromium(
    url: str, *, screenshot: Path | None = None, budget_ms: int = 30_000, timeout: float = 120
) -> str:
    """Load ``url`` in a fresh headless profile; returns the DOM after ``budget_ms`` of virtual time (the SPA's
    scripts and API calls have run by then), or writes a PNG to ``screenshot`` and returns ''."""
    with tempfile.TemporaryDirectory(prefix="mgpo-chromium-") as profile:
        what = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        cmd = [
            str(CHROMIUM),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *what,
            url,
        ]
        # Its own process group: a hung renderer or GPU helper is killed with the browser.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, "HOME": profile},
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"chromium did not finish loading {url} within {timeout:.0f} s") from None
    assert proc.returncode == 0, f"chromium exited with {proc.returncode} on {url}"
    return out


def dom_until(url: str, ready: Callable[[str], bool], attempts: int = 3) -> str:
    """The DOM of ``url`` once ``ready(text)`` holds; on a loaded machine the SPA may need a longer budget."""
    text = ""
    for i in range(attempts):
        text = visible_text(chromium(url, budget_ms=20_000 * (i + 1)))
        if ready(text):
            return text
        time.sleep(2)
    return text


def visible_text(dom: str) -> str:
    """Text a user sees: scripts and styles dropped, tags stripped, entities decoded, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def check_screenshot(path: Path) -> None:
    assert path.exists(), f"no screenshot at {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    # A blank or error page compresses to a few KB; a rendered registry or runs page is far larger.
    assert len(data) > 20_000, f"{path} is suspiciously small ({len(data)} bytes): a blank page?"


def api_json(url: str, body: dict | None = None) -> object:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def test_pipeline_summary_points_at_the_running_servers(stack):
    assert f"MLflow UI  {stack.mlflow}" in stack.run_stdout, stack.run_stdout[-2000:]
    assert f"Prefect UI {stack.prefect_ui}" in stack.run_stdout, stack.run_stdout[-2000:]


def test_mlflow_ui_shows_the_registered_model_and_its_champion_alias(stack):
    from mlflow.tracking import MlflowClient

    champion = str(MlflowClient(stack.mlflow).get_model_version_by_alias(MODEL, "champion").version)
    url = f"{stack.mlflow}/#/models/{MODEL}"
    text = dom_until(url, lambda t: f"Version {champion}" in t and "champion" in t)
    assert MODEL in text, f"the registry page does not name the model:\n{text[:2000]}"
    # The versions table: each version's row lists its aliases as "@ <alias>" tags.
    rows = dict(re.findall(r"Version (\d+)\b(.*?)(?=Version \d+\b|$)", text))
    assert champion in rows, f"no row for version {champion} in the registry page:\n{text[:3000]}"
    aliases = set(re.findall(r"@ ([\w-]+)", rows[champion]))
    assert {"champion", "challenger"} <= aliases, f"version {champion} shows aliases {aliases}"
    shot = stack.shots / "mlflow-model.png"
    chromium(url, screenshot=shot)
    check_screenshot(shot)


def test_prefect_ui_talks_to_the_server_it_is_served_from(stack):
    # The UI's JavaScript calls the API URL the server advertises; a server started on a non-default port that
    # still advertises :4200 renders "Can't connect to Server API" in the browser.
    settings = api_json(f"{stack.prefect_ui}/ui-settings")
    assert settings["api_url"].rstrip("/") == stack.prefect_api, (
        f"the Prefect UI would call {settings['api_url']} instead of {stack.prefect_api}: start the server "
        "with PREFECT_SERVER_API_PORT (or PREFECT_UI_API_URL) matching --port"
    )


def test_prefect_ui_shows_the_completed_nightly_flow_run(stack):
    runs = api_json(f"{stack.prefect_api}/flow_runs/filter", {"flows": {"name": {"any_": ["mgpo-nightly"]}}})
    assert [r["state_type"] for r in runs] == ["COMPLETED"], runs
    name, run_id = runs[0]["name"], runs[0]["id"]

    text = dom_until(f"{stack.prefect_ui}/runs", lambda t: name in t)
    assert "Can't connect to Server API" not in text, text[:2000]
    # The list row reads "mgpo-nightly <run name> ... Completed <start time> ...".
    assert re.search(rf"mgpo-nightly {re.escape(name)}\b.{{0,40}}\bCompleted\b", text), (
        f"the runs page does not show {name!r} as Completed:\n{text[:3000]}"
    )
    page = f"{stack.prefect_ui}/runs/flow-run/{run_id}"
    text = dom_until(page, lambda t: "Completed" in t and name in t)
    assert name in text and "Completed" in text and "mgpo-nightly" in text, text[:3000]
    assert name.startswith("nightly tiny-cpu "), f"a readable run name (kind, preset, start), not {name!r}"
    tasks = api_json(f"{stack.prefect_api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    names = {t["name"] for t in tasks}
    from mlflow.tracking import MlflowClient

    v = str(MlflowClient(stack.mlflow).get_model_version_by_alias(MODEL, "challenger").version)
    assert {"filter", "train", "select", "register", f"evaluate v{v}", "baseline", f"promote v{v}"} <= names, names
    for task_name in (f"evaluate v{v}", f"promote v{v}", "select"):
        assert task_name in text, f"the run page does not show the {task_name!r} task run:\n{text[:3000]}"
    for shot, url in (("prefect-runs.png", f"{stack.prefect_ui}/runs"), ("prefect-flow-run.png", page)):
        chromium(url, screenshot=stack.shots / shot)
        check_screenshot(stack.shots / shot)
    keep_for_docs(stack.shots / "prefect-flow-run.png")


def keep_for_docs(shot: Path) -> None:
    """``MGPO_DOCS_SCREENSHOTS=<folder>`` copies a checked screenshot there (how docs/images/ is refreshed)."""
    folder = os.environ.get("MGPO_DOCS_SCREENSHOTS")
    if folder:
        import shutil

        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(folder) / shot.name)


def test_prefect_ui_shows_the_nightly_summary_with_the_decision_and_mlflow_links(stack):
    (run,) = api_json(f"{stack.prefect_api}/flow_runs/filter", {"flows": {"name": {"any_": ["mgpo-nightly"]}}})
    arts = api_json(f"{stack.prefect_api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    by_key = {a["key"]: a for a in arts if a.get("key")}
    summary = by_key["nightly-summary"]
    assert "**Decision:**" in summary["data"] and "| metric | base | trained |" in summary["data"]
    # The links point at the MLflow server that runs: they open.
    link = by_key["mlflow-model-version"]["data"]
    url = link[link.index("](") + 2 : -1]
    assert url.startswith(stack.mlflow) and f"/#/models/{MODEL}/versions/" in url, link
    assert "training-progress" in by_key and by_key["training-progress"]["data"] == 100.0
    page = f"{stack.prefect_ui}/artifacts/artifact/{summary['id']}"
    text = dom_until(page, lambda t: "MGPO nightly" in t and "Decision" in t)
    assert "MGPO nightly" in text and "Decision:" in text and "trained" in text, text[:3000]
    chromium(page, screenshot=stack.shots / "prefect-nightly-summary.png")
    check_screenshot(stack.shots / "prefect-nightly-summary.png")
    keep_for_docs(stack.shots / "prefect-nightly-summary.png")
