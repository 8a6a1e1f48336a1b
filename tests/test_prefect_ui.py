"""What the Prefect UI shows of the pipeline (``tasks.artifacts``): the nightly's summary artifact (the console's
table, the decision, MLflow links), link artifacts to the MLflow version and runs, the training progress artifact;
readable flow and task run names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.artifacts import metric_rows, mlflow_ui_base, summary_markdown

SUMMARY = {
    "pipeline_run_id": None,
    "dataset": {"dataset_hash": "abc123", "report": {"counts": {"in": 10, "kept": 8, "dropped": 2}}},
    "train": {"steps_done": 30, "run_dir": "/state/runs/x", "mlflow_run_id": None},
    "selection": {"selected_step": 20},
    "registration": {"model_name": "mgpo-policy", "version": "3"},
    "evaluation": {"metrics": {"eval/synthetic/overall": 0.75, "eval/synthetic/grounding/valid_box_ratio": 1.0,
                               "eval/synthetic/a/b/c": 0.5}, "run_id": None},
    "baseline": {"metrics": {"eval/synthetic/overall": 0.25}},
    "promotion": {"promoted": True, "champion_before": None, "reason": "0.7500 > base 0.2500"},
}  # fmt: skip


def test_the_table_is_the_consoles_base_next_to_trained() -> None:
    assert metric_rows(SUMMARY) == [
        ("eval/synthetic/grounding/valid_box_ratio", None, 1.0),
        ("eval/synthetic/overall", 0.25, 0.75),
    ], "deep per-category keys stay in MLflow; headline grounding metrics are shown"


def test_summary_markdown_has_the_decision_the_table_and_the_links() -> None:
    md = summary_markdown(SUMMARY, {"model version": "http://h/#/models/mgpo-policy/versions/3"}, served=False)
    assert "**Decision:** promoted: 0.7500 > base 0.2500" in md
    assert "| `eval/synthetic/overall` | 0.2500 | 0.7500 |" in md
    assert "registered the checkpoint of step 20" in md
    assert "- [model version](http://h/#/models/mgpo-policy/versions/3)" in md
    assert "after `mgpo servers up`" in md, "a local store's links say when they open"


def test_an_http_tracking_uri_is_its_own_ui() -> None:
    assert mlflow_ui_base("http://mlflow.example:5000/") == ("http://mlflow.example:5000", True)
    assert mlflow_ui_base("sqlite:////state/mlflow.db")[1] is False


PROBE = r"""
import json, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext

from flows.nightly import run_name
from tasks.artifacts import TrainingProgress, publish

uri = sys.argv[1]
client = MlflowClient(uri)
exp = client.create_experiment("ui")
runs = [client.create_run(exp).info.run_id for _ in range(3)]
client.create_registered_model("mgpo-policy")
client.create_model_version("mgpo-policy", "file:///nowhere", run_id=runs[1])
summary = {
    "pipeline_run_id": runs[0], "dataset": {"dataset_hash": "d", "report": {}},
    "train": {"steps_done": 4, "run_dir": "r", "mlflow_run_id": runs[1]},
    "registration": {"model_name": "mgpo-policy", "version": "1"},
    "evaluation": {"metrics": {"eval/synthetic/overall": 0.5}, "run_id": runs[2]},
    "baseline": None, "promotion": {"promoted": False, "champion_before": None, "reason": "r"},
}

@task(name="train", task_run_name="train")
def train():
    p = TrainingProgress(4, "RL steps")
    for s in range(1, 4):
        p.step(s)
    return str(p.id)

@flow(name="mgpo-probe", flow_run_name=run_name("nightly"))
def probe(preset: str = "tiny-cpu"):
    progress_id = train()
    publish(summary, uri)
    return str(FlowRunContext.get().flow_run.id), progress_id

flow_run_id, progress_id = probe()
with get_client(sync_client=True) as c:
    run = c.read_flow_run(flow_run_id)
    arts = c.read_artifacts()
    out = {"flow_run_name": run.name, "artifacts": {a.key: {"type": a.type, "data": a.data, "flow_run": str(a.flow_run_id)}
           for a in arts if a.key}, "progress": [a.data for a in arts if str(a.id) == progress_id],
           "task_runs": [t.name for t in c.read_task_runs()], "runs": runs, "exp": exp}
print("PROBE " + json.dumps(out, default=str))
"""


@pytest.mark.slow
def test_a_flow_publishes_the_summary_links_and_training_progress(tmp_path: Path) -> None:
    """Real Prefect (ephemeral API) and a real MLflow store: the artifacts as the UI reads them back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")  # fmt: skip
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = subprocess.run([sys.executable, "-c", PROBE, uri], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    line = next((x for x in p.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(line.removeprefix("PROBE "))
    assert out["flow_run_name"].startswith("nightly tiny-cpu 20"), out["flow_run_name"]
    assert "train" in out["task_runs"]
    arts = out["artifacts"]
    assert arts["nightly-summary"]["type"] == "markdown" and "# MGPO nightly" in arts["nightly-summary"]["data"]
    runs, exp = out["runs"], out["exp"]
    # A link artifact's data is the markdown link the UI renders: [text](url)
    assert arts["mlflow-model-version"]["data"].endswith("/#/models/mgpo-policy/versions/1)")
    assert arts["mlflow-training-run"]["data"].endswith(f"/#/experiments/{exp}/runs/{runs[1]})")
    assert arts["mlflow-evaluation-run"]["data"].endswith(f"/#/experiments/{exp}/runs/{runs[2]})")
    assert arts["mlflow-pipeline-run"]["data"].startswith("[MLflow pipeline run](")
    assert out["progress"] == [75.0], "three of four steps done"
