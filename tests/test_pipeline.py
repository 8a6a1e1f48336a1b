"""The nightly pipeline end to end through Prefect (ephemeral API) and MLflow (SQLite), with a failure and a rerun.

A failure is injected into evaluation; the rerun must not execute filtering, training or registration again
(counted from the stage bodies' execution records), must evaluate and promote, must not duplicate the model
version, and must end in the same state as a clean run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

SETS = [
    "algorithm.total_steps=2",
    "algorithm.prompts_per_step=2",
    "algorithm.mini_batch_prompts=2",
    "algorithm.micro_batch_size=4",
    "rollout.n=2",
    "rollout.engine=hf",
    "rollout.max_new_tokens_turn1=8",
    "rollout.max_new_tokens_turn2=4",
    "rollout.min_pixels=3136",
    "rollout.max_pixels=12544",
    "data.synthetic_train=4",
    "data.synthetic_eval=4",
    "data.synthetic_width=448",
    "data.synthetic_height=336",
    "evaluation.max_new_tokens=8",
    "evaluation.limit=4",
    "checkpoint.every_steps=1",
]


def run_pipeline(state: Path, *, fail: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mgpo_core.cli", "run", "--set", f"state_dir={state}"]
    for s in SETS:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    env.update(MGPO_TASK_RETRIES="0", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    if fail:
        env["MGPO_FAIL_STAGE"] = fail
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def executions(state: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (state / "pipeline" / "executions.jsonl").read_text().splitlines():
        stage = json.loads(line)["stage"]
        counts[stage] = counts.get(stage, 0) + 1
    return counts


def registry_state(state: Path) -> dict:
    client = MlflowClient(f"sqlite:///{state}/mlflow.db")
    versions = client.search_model_versions("name='mgpo-policy'")
    out = {"versions": sorted(str(v.version) for v in versions)}
    for alias in ("champion", "challenger"):
        out[alias] = str(client.get_model_version_by_alias("mgpo-policy", alias).version)
    v = client.get_model_version("mgpo-policy", out["challenger"])
    wanted = ("eval/", "mgpo.dataset_hash", "mgpo.config_hash", "mgpo.checkpoint")
    out["tags"] = {
        k: val
        for k, val in v.tags.items()
        if k.startswith(wanted) and "timing" not in k and "run_id" not in k
    }
    return out


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("clean")
    p = run_pipeline(state)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "MGPO pipeline finished" in p.stdout and "champion" in p.stdout and "MLflow UI" in p.stdout
    return state


def test_clean_run_registers_evaluates_and_promotes(clean_run):
    assert executions(clean_run) == {"filter": 1, "train": 1, "register": 1, "evaluate": 1, "promote": 1}
    reg = registry_state(clean_run)
    assert reg["versions"] == ["1"] and reg["champion"] == reg["challenger"] == "1"
    assert "eval/synthetic/overall" in reg["tags"]
    client = MlflowClient(f"sqlite:///{clean_run}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mgpo").experiment_id])
    parents = [r for r in runs if r.data.tags.get("mgpo.stage") == "pipeline"]
    assert len(parents) == 1
    children = {
        r.data.tags.get("mgpo.stage")
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert {"filter", "train", "register", "evaluate"} <= children, (
        "stage runs are nested under the pipeline run"
    )


def test_rerun_after_an_evaluation_failure_runs_only_what_failed(tmp_path, clean_run):
    state = tmp_path / "state"
    p = run_pipeline(state, fail="evaluate")
    assert p.returncode != 0
    assert "injected failure in stage 'evaluate'" in p.stdout + p.stderr
    assert executions(state) == {"filter": 1, "train": 1, "register": 1, "evaluate": 1}
    p = run_pipeline(state)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # Filtering, training and registration came from cache; evaluation ran again; promotion ran once.
    assert executions(state) == {"filter": 1, "train": 1, "register": 1, "evaluate": 2, "promote": 1}
    rerun, clean = registry_state(state), registry_state(clean_run)
    # The dataset hash covers the samples' image paths, which live under each state folder: compare the rest.
    assert rerun["tags"].pop("mgpo.dataset_hash") == next((state / "datasets").iterdir()).name
    clean["tags"].pop("mgpo.dataset_hash")
    assert rerun == clean, "the rerun must end where a clean run ends (same weights digest, scores, aliases)"
