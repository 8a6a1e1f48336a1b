"""Pure pieces of the trainer: resumable sampler, rank sharding with whole groups, DeepSpeed config, metrics sink."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mgpo_core.algorithms import grpo_advantages
from mgpo_core.config import load_config
from mgpo_core.ops.tracking import MetricsSink, replay_pending
from mgpo_core.training.ds_config import build_ds_config, micro_steps_per_minibatch
from mgpo_core.training.sampler import PromptSampler, SamplerState, shard_for_rank


def test_sampler_covers_each_epoch_once_and_resumes_exactly():
    items = list(range(10))
    s = PromptSampler(items, seed=3)
    drawn = [s.next_batch(4) for _ in range(5)]  # 20 draws = two full epochs
    flat = [x for b in drawn for x in b]
    assert sorted(flat[:10]) == items and sorted(flat[10:]) == items
    assert flat[:10] != flat[10:], "each epoch gets its own permutation"
    # Resume from any saved position reproduces the rest.
    for k in range(5):
        s2 = PromptSampler(items, seed=3)
        for _ in range(k):
            s2.next_batch(4)
        saved = SamplerState(**s2.state.to_dict())
        s3 = PromptSampler(items, seed=3, state=saved)
        assert [s3.next_batch(4) for _ in range(5 - k)] == drawn[k:]


def test_empty_training_set_is_a_clear_error():
    with pytest.raises(ValueError, match="training set is empty"):
        PromptSampler([], seed=0)


def test_rank_shards_keep_groups_whole_so_advantages_match_the_single_process_ones():
    prompts = list(range(8))
    n = 4
    g = torch.Generator().manual_seed(0)
    rewards = {p: (torch.rand(n, generator=g) > 0.5).float() for p in prompts}
    whole = grpo_advantages(
        torch.cat([rewards[p] for p in prompts]), torch.repeat_interleave(torch.arange(8), n)
    )
    sharded = []
    for rank in range(2):
        mine = shard_for_rank(prompts, rank, 2)
        r = torch.cat([rewards[p] for p in mine])
        sharded.append(grpo_advantages(r, torch.repeat_interleave(torch.arange(len(mine)), n)))
    torch.testing.assert_close(torch.cat(sharded), whole)
    with pytest.raises(ValueError, match="divisible by the world size"):
        shard_for_rank(list(range(3)), 0, 2)


def test_deepspeed_config_from_mgpo_config():
    cfg = load_config("tiny-cpu", ["deepspeed.zero_stage=3", "deepspeed.bf16=true", "model.dtype=bfloat16"])
    ds = build_ds_config(cfg, world=1)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    # tiny-cpu: 2 prompts × n=4 per mini-batch = 8 episodes, micro-batches of 4 → 2 accumulation steps.
    assert ds["gradient_accumulation_steps"] == 2 == micro_steps_per_minibatch(cfg, 1)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_clipping"] == 1.0
    assert micro_steps_per_minibatch(cfg, 2) == 1
    bad = load_config("tiny-cpu", ["algorithm.micro_batch_size=3"])
    with pytest.raises(ValueError, match=r"micro_batch_size=3 does not divide .* use one of \[1, 2, 4, 8\]"):
        build_ds_config(bad, world=1)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_infra_deepspeed_files_are_valid_starting_points(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "infra" / "deepspeed" / name
    cfg = load_config("tiny-cpu", [f"deepspeed.config_file={path}"])
    ds = build_ds_config(cfg, world=1)
    assert json.loads(path.read_text())["zero_optimization"]["stage"] in (2, 3)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage  # the MGPO config decides the stage


def test_metrics_are_kept_when_the_server_is_down_and_delivered_later(tmp_path):
    down = "http://127.0.0.1:9"  # discard port: nothing listens
    sink = MetricsSink(down, "some-run", tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 4):
            sink.log({"reward/mean": step / 10}, step)
    assert sum("unreachable" in str(w.message) for w in caught) == 1, "warn once, not every step"
    pending = [json.loads(x) for x in (tmp_path / "metrics-pending.jsonl").read_text().splitlines()]
    assert [r["step"] for r in pending] == [1, 2, 3]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    assert replay_pending(tmp_path, uri, run_id) == 3
    hist = client.get_metric_history(run_id, "reward/mean")
    assert sorted((h.step, round(h.value, 6)) for h in hist) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert not (tmp_path / "metrics-pending.jsonl").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # the journal keeps everything
