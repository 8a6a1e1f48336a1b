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
    first = MetricsSink(uri, run_id, tmp_path / "run", system_metrics=False)
    for step in (1, 2, 3):  # checkpoint at step 2, then killed after logging step 3
        first.log({"reward/mean": step / 10}, step)
    resumed = MetricsSink(uri, run_id, tmp_path / "run", system_metrics=False)  # the relaunched process resumes from step 2
    for step in (3, 4):
        resumed.log({"reward/mean": step / 10}, step)
    hist = client.get_metric_history(run_id, "reward/mean")
    assert sorted(h.step for h in hist) == [1, 2, 3, 4]
    journal = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in journal] == [1, 2, 3, 3, 4] and journal[3].get("redone") is True
    # Another MLflow run (the old one was missing from the store): every step is sent to it.
    other = client.create_run(client.get_experiment_by_name("e").experiment_id).info.run_id
    MetricsSink(uri, other, tmp_path / "run", system_metrics=False).log({"reward/mean": 0.3}, 3)
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


def test_experiments_open_as_model_training_and_runs_name_their_source_and_datasets(tmp_path):
    from mgpo_core.ops.tracking import (
        EXPERIMENT_KIND,
        EXPERIMENT_KIND_TAG,
        ensure_experiment,
        ensure_run,
        log_dataset_input,
    )

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())  # no kind tag
    assert ensure_experiment(client, "made-before") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    run_id = ensure_run(uri, "fresh", "train", tmp_path / "state")
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert run.data.tags["mlflow.source.name"] == "mgpo train" and run.data.tags["mlflow.source.type"] == "JOB"
    commit = run.data.tags.get("mlflow.source.git.commit")
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    log_dataset_input(uri, run_id, name="train", digest="0123abcd" * 4, source=str(tmp_path / "ds"),
                      context="training", profile={"kept": 12})
    (ds,) = client.get_run(run_id).inputs.dataset_inputs
    assert (ds.dataset.name, ds.dataset.digest) == ("train", "0123abcd" * 4)
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    assert json.loads(ds.dataset.profile) == {"kept": 12}


def test_system_metrics_reach_the_training_run(tmp_path, monkeypatch):
    """The sink starts MLflow's system-metrics monitor on its run: CPU and memory appear as ``system/<node>/...``."""
    import time

    from mgpo_core.ops.tracking import MetricsSink

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_NODE_ID", "node-a")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    sink = MetricsSink(uri, run_id, tmp_path / "run")
    assert sink.system_monitor is not None
    try:
        for _ in range(600):  # until the first sample is logged (a bound, not a timing claim)
            if any(k.startswith("system/") for k in client.get_run(run_id).data.metrics):
                break
            time.sleep(0.5)
    finally:
        sink.system_monitor.finish()
    keys = set(client.get_run(run_id).data.metrics)
    assert {"system/node-a/cpu_utilization_percentage", "system/node-a/system_memory_usage_megabytes"} <= keys, keys
    assert MetricsSink(uri, run_id, tmp_path / "run", system_metrics=False).system_monitor is None


def test_one_system_metrics_monitor_per_node_under_its_node_id():
    """Local rank 0 of every node samples it (and only it: two monitors on one node would log the same machine
    twice); the node id is the host on one node, ``node<k>-<host>`` on several, k from the launcher's variables."""
    from mgpo_core.ops.tracking import node_position, system_metrics_node

    def ds(rank: int, local: int, node: int) -> dict[str, str]:  # DeepSpeed's launcher: 2 nodes x 2 ranks
        return {"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
                "CROSS_RANK": str(node), "CROSS_SIZE": "2"}  # fmt: skip

    ids = [system_metrics_node(ds(2 * n + lr, lr, n), host="h") for n in (0, 1) for lr in (0, 1)]
    assert ids == ["node0-h", None, "node1-h", None]
    # torchrun's names, and the ranks alone (node = rank // local size)
    tr = {"RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "6", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "3"}
    assert system_metrics_node(tr, host="h") == "node1-h"
    assert node_position({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "2"}) == (2, 3)
    # one node (one process, or all ranks local): the host name, as before
    assert system_metrics_node({}, host="h") == "h"
    assert system_metrics_node({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}, host="h") is None
    assert system_metrics_node({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}, host="h") == "h"


def test_a_node_without_the_sqlite_store_starts_no_monitor(tmp_path, monkeypatch):
    """A node that cannot see rank 0's SQLite file (no shared disk) does not create an empty store of its own."""
    from mgpo_core.ops.tracking import start_node_system_metrics

    monkeypatch.setenv("LOCAL_RANK", "0")
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert start_node_system_metrics(f"sqlite:///{missing}", "0123") is None
    assert not missing.parent.exists()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert start_node_system_metrics(f"sqlite:///{tmp_path}/x.db", "0123") is None


def test_episode_pictures_are_stepped_images_of_the_training_run(hf_engine, tiny_cfg, synthetic_samples, tmp_path):
    """Sampled-episode pictures reach MLflow as images keyed ``episodes`` with their RL step (the run's image view
    steps through them), beside the plain files."""
    from mgpo_core.training.episode_log import log_episodes
    from mgpo_core.training.trainer import rollout_episodes

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    eps = rollout_episodes(hf_engine, tiny_cfg, synthetic_samples[:2], seed=1, n=2)
    for step in (3, 6):
        log_episodes(eps, [0.5, -0.5] * 2, step, run_dir=tmp_path / "run", k=4, tracking_uri=uri, run_id=run_id)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    # MLflow names them images/<key>+step+<step>+timestamp+<ms>+<uuid>.png (and writes a .json beside each)
    steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png") and "episodes" in p)
    assert steps == [3, 6], images


def test_the_metrics_looked_at_first_head_the_run_page(tmp_path):
    """Reward, valid-box ratio, crop-holds-target and validation accuracy are also logged in a section whose name
    sorts before every other (MLflow's run page orders sections by name), with the same values and steps."""
    from mgpo_core.ops.tracking import OVERVIEW

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    sink = MetricsSink(uri, run_id, tmp_path / "run", system_metrics=False)
    for step in (1, 2):
        sink.log({"actor/approx_kl": 0.0, "reward/mean": step / 4, "rollout/valid_box_ratio": step / 2,
                  "rollout/box_contains_target": step / 8, "loss/total": 1.0}, step)
    sink.log({"val/accuracy": 0.5}, 2)
    keys = set(client.get_run(run_id).data.metrics)
    sections = sorted({k.rsplit("/", 1)[0] for k in keys})  # the UI's order (localeCompare ranks digits first too)
    assert sections[0] == "0_overview" and set(OVERVIEW.values()) <= keys
    for src, copy in OVERVIEW.items():
        orig = [(m.step, m.value) for m in client.get_metric_history(run_id, src)]
        assert sorted(orig) == sorted((m.step, m.value) for m in client.get_metric_history(run_id, copy))
