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
    # Two RL steps cannot beat the base model: let the first version become champion anyway (the rule that it
    # must beat the base is tested in test_registry; here the caching and the aliases are, and a version that
    # must lose is test_a_new_version_that_does_not_beat_the_champion_leaves_it_in_place)
    "evaluation.min_improvement=-1",
]


def run_pipeline(state: Path, *, fail: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mgpo_cli", "run", "--preset", "tiny-cpu", "--set", f"state_dir={state}"]
    for s in (*SETS, *extra):
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    env.update(MGPO_TASK_RETRIES="0", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    if fail:  # through the stage-hook seam (tests/stage_hooks.py), not code in the tasks
        tests_dir = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
        env.update(MGPO_STAGE_HOOKS="stage_hooks:fail_stage", MGPO_FAIL_STAGE=fail)
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
    # A clean console: stage progress and the summary; library noise and Prefect's lines are in the stage logs.
    console = p.stdout + p.stderr
    assert "train     step 2/2" in console and "filter    dataset" in console, console[-3000:]
    for noise in ("Warning", "Loading weights", "Traceback", "Finished in state", "prefect"):
        assert noise not in console, f"{noise!r} reached the console:\n{console[-3000:]}"
    logs = next((state / "logs").iterdir())
    assert {"filter.log", "train.log", "register.log", "evaluate.log", "promote.log"} <= {
        f.name for f in logs.iterdir()
    }
    return state


def test_clean_run_registers_evaluates_and_promotes(clean_run):
    assert executions(clean_run) == {
        "filter": 1, "train": 1, "select": 1, "register": 1, "evaluate": 1, "baseline": 1, "promote": 1
    }  # fmt: skip
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
    assert {"filter", "train", "register", "evaluate", "baseline"} <= children, (
        "stage runs are nested under the pipeline run"
    )
    # The version's model card carries the scores the evaluation wrote (this version's and the base model's, by
    # the strict rule) and the promotion decision.
    from mgpo_core.modeling.source import resolve_registry_model

    def overall(folder: Path) -> float:
        return json.loads((folder / "synthetic" / "summary.json").read_text())["metrics"]["overall"]

    mine = overall(clean_run / "eval" / "mgpo-policy-v1")
    (base_dir,) = (clean_run / "eval").glob("base-*")
    hf = resolve_registry_model("models:/mgpo-policy/1", tracking_uri=f"sqlite:///{clean_run}/mlflow.db",
                                cache_root=clean_run / "card-check").hf_dir  # fmt: skip
    card = (hf / "README.md").read_text()
    assert f"| synthetic | {mine:.4f} | {overall(base_dir):.4f} |" in card, card
    assert "Promotion on `eval/synthetic/overall`: promoted to champion" in card, card


def test_rerun_after_an_evaluation_failure_runs_only_what_failed(tmp_path, clean_run):
    state = tmp_path / "state"
    p = run_pipeline(state, fail="evaluate")
    assert p.returncode != 0
    assert "injected failure in stage 'evaluate'" in p.stdout + p.stderr
    # One short paragraph: the stage, the error, the log with the traceback, how to rerun.
    assert "Traceback" not in p.stdout + p.stderr and len(p.stderr.strip().splitlines()) <= 4, p.stderr
    assert "failed in stage 'evaluate'" in p.stderr and "rerun: mgpo run" in p.stderr
    log = Path(p.stderr.split("full log and traceback: ", 1)[1].split()[0])
    assert log.name == "evaluate.log" and "Traceback" in log.read_text()
    assert executions(state) == {"filter": 1, "train": 1, "select": 1, "register": 1, "evaluate": 1}
    p = run_pipeline(state)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # Filtering, training and registration came from cache; evaluation ran again; promotion ran once.
    assert executions(state) == {
        "filter": 1, "train": 1, "select": 1, "register": 1, "evaluate": 2, "baseline": 1, "promote": 1
    }  # fmt: skip
    rerun, clean = registry_state(state), registry_state(clean_run)
    # The dataset hash covers the samples' image paths, which live under each state folder: compare the rest.
    assert rerun["tags"].pop("mgpo.dataset_hash") == next((state / "datasets").iterdir()).name
    clean["tags"].pop("mgpo.dataset_hash")
    assert rerun == clean, "the rerun must end where a clean run ends (same weights digest, scores, aliases)"
    # A changed evaluation setting (e.g. after fixing a benchmark path) redoes only evaluation and promotion:
    # the new pipeline parent run must not invalidate the finished upstream stages.
    p = run_pipeline(state, extra=("evaluation.limit=3",))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert executions(state) == {
        "filter": 1, "train": 1, "select": 1, "register": 1, "evaluate": 3, "baseline": 2, "promote": 2
    }  # fmt: skip


def _mgpo(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    return subprocess.run(
        [sys.executable, "-m", "mgpo_cli", *args], env=env, capture_output=True, text=True, timeout=400
    )


def test_day_two_servers_up_then_rerun_deleted_version_and_moved_state(clean_run, tmp_path):
    """The README's own order: run (serverless), `mgpo servers up`, run again — the cached stages point into the
    same store the server serves, so the rerun succeeds from cache. Then a registered version is deleted, and the
    state folder is moved: each rerun validates the cached results, runs again what went stale and says why.
    (Runs last: it changes the clean run's state folder.)"""
    from mgpo_core.ops.servers import free_port, read_records, stop_process_group, stop_servers

    state = clean_run
    before = executions(state)
    ports = [str(free_port()), str(free_port())]
    up = _mgpo("servers", "up", "--state-dir", str(state), "--prefect-port", ports[0], "--mlflow-port", ports[1],
               "--timeout", "300")  # fmt: skip
    pids = [r.pid for r in read_records(state).values()]
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        p = run_pipeline(state)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert f"http://127.0.0.1:{ports[1]}" in p.stdout, "the summary names the local MLflow server"
        after = executions(state)
        assert after == {**before, "promote": before["promote"] + 1}, "filter…evaluate came from the cache"
        served = MlflowClient(f"http://127.0.0.1:{ports[1]}")
        assert served.get_model_version_by_alias("mgpo-policy", "champion").version == "1"
    finally:
        stop_servers(state, timeout=20)
        for pid in pids:
            stop_process_group(pid, timeout=5)

    # A registered version deleted in the UI: registration (and what follows) runs again; nothing before it.
    MlflowClient(f"sqlite:///{state}/mlflow.db").delete_model_version("mgpo-policy", "1")
    p = run_pipeline(state)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "stage 'register' is stale: model version mgpo-policy v1 is not in the tracking store" in p.stdout + p.stderr
    again = executions(state)
    assert {k: again[k] - after.get(k, 0) for k in again} == {
        "filter": 0, "train": 0, "select": 0, "register": 1, "evaluate": 1, "baseline": 0, "promote": 1
    }  # fmt: skip
    assert registry_state(state)["champion"] == "2"
    dataset_hash = next((state / "datasets").iterdir()).name

    # The state folder moved: every cached result names the old place, so each stage runs again; the dataset
    # keeps its hash, and the retrained identical checkpoint is recognised as the registered version.
    moved = tmp_path / "moved"
    state.rename(moved)
    p = run_pipeline(moved)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "stage 'filter' is stale" in p.stdout + p.stderr and "outside the state folder" in p.stdout + p.stderr
    assert next((moved / "datasets").iterdir()).name == dataset_hash
    reg = registry_state(moved)
    assert reg["versions"] == ["2"] and reg["champion"] == reg["challenger"] == "2"


def test_a_new_version_that_does_not_beat_the_champion_leaves_it_in_place(tmp_path):
    """The clean run forces promotion (min_improvement=-1); here the second night's version must lose: with
    min_improvement=1 no accuracy in [0, 1] can beat a champion's by more than 1. It is registered and evaluated,
    becomes the challenger, and `champion` stays on version 1."""
    state = tmp_path / "state"
    p = run_pipeline(state)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert registry_state(state)["champion"] == "1"
    # Another night: a different sampling seed trains a different checkpoint (version 2).
    p = run_pipeline(state, extra=("algorithm.seed=1", "evaluation.min_improvement=1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    reg = registry_state(state)
    assert reg["versions"] == ["1", "2"] and reg["challenger"] == "2"
    assert reg["champion"] == "1", "a version that does not beat the champion must not take its alias"
    assert "champion unchanged" in p.stdout and "does not beat champion v1" in p.stdout, p.stdout[-3000:]
    counts = executions(state)
    assert (counts["train"], counts["register"], counts["promote"]) == (2, 2, 2)
