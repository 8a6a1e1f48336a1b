"""Metrics after a resume: steps trained again after a checkpoint older than the last logged step are journaled
again but reach MLflow once (a real SQLite store)."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from mgpo_core.training.tracking import MetricsSink


def test_a_resumed_run_does_not_send_the_steps_after_its_checkpoint_twice(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    first = MetricsSink(uri, run_id, tmp_path / "run")
    for step in (1, 2, 3):  # checkpoint at step 2, then killed after logging step 3
        first.log({"reward/mean": step / 10}, step)
    resumed = MetricsSink(uri, run_id, tmp_path / "run")  # the relaunched process resumes from step 2
    for step in (3, 4):
        resumed.log({"reward/mean": step / 10}, step)
    hist = client.get_metric_history(run_id, "reward/mean")
    assert sorted(h.step for h in hist) == [1, 2, 3, 4]
    journal = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in journal] == [1, 2, 3, 3, 4] and journal[3].get("redone") is True
    # Another MLflow run (the old one was missing from the store): every step is sent to it.
    other = client.create_run(client.get_experiment_by_name("e").experiment_id).info.run_id
    MetricsSink(uri, other, tmp_path / "run").log({"reward/mean": 0.3}, 3)
    assert [h.step for h in client.get_metric_history(other, "reward/mean")] == [3]
