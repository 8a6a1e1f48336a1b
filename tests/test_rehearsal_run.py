"""The 7B recipe rehearsed end to end, as docs/REHEARSAL.md tells a user to run it: `mgpo rehearsal prepare`, then
`mgpo run --preset rehearsal-7b --input <the MME-RealWorld JSON>`. Every stage of the recipe runs: the filter
(evaluation questions dropped, a validation split held out), the DeepSpeed launcher with 2 ranks, ZeRO-3, KL against
the reference model, vLLM rollouts, checkpoints, checkpoint selection on the validation split, the export,
registration, evaluation on the four benchmarks in their published formats, promotion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = ("vstar", "hrbench_4k", "hrbench_8k", "mme_realworld_lite")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    work = tmp_path_factory.mktemp("rehearsal")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(MGPO_REHEARSAL_DIR=str(work / "inputs"), MGPO_TASK_RETRIES="0")
    mgpo = [sys.executable, "-m", "mgpo_cli"]
    prep = subprocess.run([*mgpo, "rehearsal", "prepare"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert prep.returncode == 0, prep.stdout + prep.stderr
    train = work / "inputs" / "data" / "mme_realworld" / "MME-RealWorld.json"
    assert f"--input {train}" in prep.stdout
    run = subprocess.run([*mgpo, "run", "--preset", "rehearsal-7b", "--input", str(train)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=3000)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    return work / ".mgpo", run.stdout


def test_the_filter_drops_evaluation_questions_and_holds_out_the_validation_split(rehearsal):
    state, console = rehearsal
    (dataset,) = (state / "datasets").iterdir()
    report = json.loads((dataset / "report.json").read_text())
    assert report["dropped_by_reason"] == {"eval_overlap": 4}
    assert report["counts"] == {"in": 48, "kept": 44, "dropped": 4, "train": 36, "validation": 8}
    assert '4 dropped {"eval_overlap": 4}' in console


def test_training_ran_the_recipe_two_zero3_ranks_with_kl_vllm_and_checkpoints(rehearsal):
    state, _ = rehearsal
    (run_dir,) = (state / "runs").iterdir()
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps == ["step-000001", "step-000002"]
    for step in steps:  # ZeRO-3 partitions of both ranks, each rank's RNG state
        files = {p.name for p in (run_dir / "checkpoints" / step).rglob("*") if p.is_file()}
        assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files
        assert any(f.startswith("rng_rank001") for f in files)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_logged = [r for r in rows if "timing/step_s" in r["metrics"]]
    assert [r["step"] for r in steps_logged] == [1, 2]
    m2 = steps_logged[-1]["metrics"]
    assert m2["loss/kl"] != 0.0, "the KL against the reference model is in the loss after an update"
    config = (run_dir / "config.yaml").read_text()
    assert "zero_stage: 3" in config and "num_gpus: 2" in config and "launcher: deepspeed" in config
    # rollout.engine: vllm (not auto: no fallback), and the updated weights were pushed into it every step.
    assert "engine: vllm" in config and m2["timing/weight_sync_s"] > 0


def test_selection_scored_the_validation_split_and_the_export_loads(rehearsal):
    state, console = rehearsal
    (run_dir,) = (state / "runs").iterdir()
    sel = json.loads((run_dir / "selection.json").read_text())
    assert sel["metric"] == "eval/validation/overall" and set(sel["curve"]) == {"1", "2"}
    assert f"select    the checkpoint of step {sel['best_step']}" in console
    export = Path(sel["best_dir"])
    if not export.is_absolute():
        export = state.parent / export
    from mgpo_core.training.checkpoint import check_weight_index

    check_weight_index(export)
    assert not list(export.glob("*.index.json")), "no weight index of the sharded base in the export"


def test_the_version_is_registered_evaluated_on_the_four_benchmarks_and_promotion_decided(rehearsal):
    state, console = rehearsal
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='mgpo-policy'")
    assert "challenger" in client.get_model_version("mgpo-policy", version.version).aliases
    for bench in BENCHMARKS:
        assert f"evaluate  {bench}: overall" in console and f"base      {bench}: overall" in console
        records = state / "eval" / f"mgpo-policy-v{version.version}" / bench
        assert any(records.glob("*.jsonl")), f"no per-question records for {bench}"
    assert "promote   " in console and "champion" in console
