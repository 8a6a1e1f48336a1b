"""Metrics after a resume: steps trained again after a checkpoint older than the last logged step are journaled
again but reach MLflow once (a real SQLite store)."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from mgpo_core.ops.tracking import MetricsSink


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


def test_collapse_signals_rise_when_the_valid_box_ratio_or_the_replies_fall(tmp_path):
    from mgpo_core.training.collapse import CollapseMonitor

    mon = CollapseMonitor(smoothing=0.5, threshold=0.5)
    healthy = {"rollout/valid_box_ratio": 0.8, "rollout/response_len_turn1": 40.0}
    for _ in range(4):
        out = mon.update(healthy)
    assert out["collapse/valid_box_ratio_drop"] == 0.0 and out["collapse/alarm"] == 0.0
    for _ in range(4):  # boxes vanish; reply length holds
        out = mon.update({"rollout/valid_box_ratio": 0.05, "rollout/response_len_turn1": 40.0})
    assert out["collapse/valid_box_ratio_drop"] > 0.8 and out["collapse/alarm"] == 1.0
    assert out["collapse/response_len_turn1_drop"] == 0.0
    # A resumed run rebuilds the peaks from its journal, so the drop is not forgotten across a restart.
    journal = tmp_path / "metrics.jsonl"
    rows = [healthy] * 4 + [{"rollout/valid_box_ratio": 0.05, "rollout/response_len_turn1": 40.0}] * 4
    journal.write_text("".join(json.dumps({"step": i + 1, "metrics": m}) + "\n" for i, m in enumerate(rows)))
    again = CollapseMonitor.from_journal(journal, upto=8, smoothing=0.5, threshold=0.5)
    assert again.state_dict() == mon.state_dict()
