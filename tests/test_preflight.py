"""Preflight: each check finds what a long run would find late, and says what, where and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mgpo_core.config import load_config
from mgpo_core.ops import preflight as pf


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A small model directory laid out as the real checkpoint (5 shards + index)."""
    from mgpo_core.modeling.base import base_model_for
    from mgpo_core.modeling.like import build_like

    return build_like(tmp_path_factory.mktemp("m") / "model", base_model_for(tmp_path_factory.mktemp("c"), seed=0))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from mgpo_core.data.published import write_published_sets

    return write_published_sets(tmp_path_factory.mktemp("d") / "data", train=8, per_benchmark=2, overlap=2)


def _cfg(tmp_path, model=None, *extra):
    sets = [f"state_dir={tmp_path}", f"tracking.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db", *extra]
    if model is not None:
        sets.append(f"model.path={model}")
    return load_config("tiny-cpu", sets)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------- model
def test_model_check_passes_a_complete_sharded_directory(sharded):
    c = pf.check_model_dir(sharded)
    assert c.status == "ok" and "5 weight file(s)" in c.detail


def test_model_check_names_a_missing_shard(sharded, tmp_path):
    d = _copy(sharded, tmp_path / "m")
    (d / "model-00003-of-00005.safetensors").unlink()
    c = pf.check_model_dir(d)
    assert c.status == "fail" and "model-00003-of-00005.safetensors" in c.detail and c.fix


def test_model_check_names_missing_tokenizer_processor_and_an_unknown_processor_class(sharded, tmp_path):
    d = _copy(sharded, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    pre = json.loads((d / "preprocessor_config.json").read_text())
    (d / "preprocessor_config.json").write_text(json.dumps({**pre, "image_processor_type": "Qwen2_5_VLImageProcessor"}))
    c = pf.check_model_dir(d)
    assert c.status == "fail" and "tokenizer" in c.detail and "Qwen2VLImageProcessor" in c.detail
    assert pf.check_model_dir(tmp_path / "nowhere").status == "fail"


# --------------------------------------------------------------------------------------- kernels, versions
def test_attention_check_announces_the_sdpa_fallback_without_flash_attn(tmp_path):
    from mgpo_core.modeling.loading import flash_attn_available, resolve_attn_implementation

    cfg = _cfg(tmp_path, None, "model.attn_implementation=flash_attention_2", "algorithm.shared_prompt=true")
    c = pf.check_attention(cfg, cuda=False)
    assert c.status == "warn" and "SDPA" in c.detail and "flash-attn" in c.fix
    assert resolve_attn_implementation("flash_attention_2") == ("flash_attention_2" if flash_attn_available() and
                                                                 _cuda() else "sdpa")  # fmt: skip
    assert pf.check_attention(_cfg(tmp_path), cuda=False).status == "ok"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_vllm_check_refuses_another_minor_version(tmp_path):
    cfg = _cfg(tmp_path, None, "rollout.engine=vllm")
    assert pf.check_vllm(cfg, version="0.32.0").status == "ok"
    c = pf.check_vllm(cfg, version="0.33.1")
    assert c.status == "fail" and "0.32" in c.fix
    assert pf.check_vllm(_cfg(tmp_path, None, "rollout.engine=hf"), version="0.1").status == "ok"


def test_devices_check_compares_visible_gpus_with_num_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cfg = _cfg(tmp_path, None, "deepspeed.launcher=deepspeed", "deepspeed.num_gpus=8")
    c = pf.check_devices(cfg, gpu_count=lambda: 4)
    assert c.status == "fail" and "4 GPU(s) visible" in c.detail and "num_gpus=4" in c.fix
    assert pf.check_devices(cfg, gpu_count=lambda: 8).status == "ok"
    gpu_recipe = _cfg(tmp_path, None, "deepspeed.bf16=true", "model.dtype=bfloat16")
    assert pf.check_devices(gpu_recipe, gpu_count=lambda: 0).status == "fail"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert pf.check_devices(gpu_recipe, gpu_count=lambda: 0).status == "ok"


def test_hosts_check_runs_ssh_for_every_hostfile_host_and_names_the_silent_ones(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("node-a slots=8\n# a comment\nnode-b slots=8\n")
    cfg = _cfg(tmp_path, None, "deepspeed.launcher=deepspeed", f"deepspeed.hostfile={hf}")
    asked = []
    c = pf.check_hosts(cfg, runner=lambda argv: asked.append(argv[0]) or (0 if argv[0] == "node-a" else 255))
    assert asked == ["node-a", "node-b"] and c.status == "fail" and "node-b" in c.detail and "node-a" not in c.detail
    # The real runner: ssh to a host that cannot resolve fails fast in batch mode.
    hf.write_text("no-such-host.invalid slots=1\n")
    assert pf.check_hosts(cfg).status == "fail"


# -------------------------------------------------------------------------------------------------- data
def test_benchmarks_check_refuses_missing_and_unparsable_data_before_training(tmp_path, published):
    ok = _cfg(tmp_path, None, "evaluation.benchmarks=[vstar,hrbench_4k,mme_realworld_lite]",
              "evaluation.promotion_metric=eval/vstar/overall",
              f"evaluation.data_paths={{vstar: {published['vstar']}, hrbench_4k: {published['hrbench_4k']}, "
              f"mme_realworld_lite: {published['mme_realworld_lite']}}}")  # fmt: skip
    assert pf.check_benchmarks(ok).status == "ok"
    missing = _cfg(tmp_path, None, "evaluation.benchmarks=[vstar,hrbench_8k]",
                   "evaluation.promotion_metric=eval/vstar/overall",
                   f"evaluation.data_paths={{vstar: {published['vstar']}}}")  # fmt: skip
    c = pf.check_benchmarks(missing)
    assert c.status == "fail" and "hrbench_8k" in c.detail and "evaluation.data_paths" in c.fix
    garbage = tmp_path / "hr.tsv"
    garbage.write_text("index\tquestion\nnot\ta benchmark\n")
    bad = _cfg(tmp_path, None, "evaluation.benchmarks=[hrbench_4k]", "evaluation.promotion_metric=eval/hrbench_4k/overall",
               f"evaluation.data_paths={{hrbench_4k: {garbage}}}")  # fmt: skip
    assert pf.check_benchmarks(bad).status == "fail"


def test_training_data_check_refuses_a_real_model_without_data(tmp_path, sharded):
    cfg = _cfg(tmp_path, sharded)
    c = pf.check_training_data(cfg, [])
    assert c.status == "fail" and "--input" in c.fix and "allow_synthetic" in c.fix
    assert pf.check_training_data(_cfg(tmp_path, sharded, "data.allow_synthetic=true"), []).status == "ok"
    assert pf.check_training_data(cfg, [str(tmp_path / "nope.json")]).status == "fail"
    assert pf.check_training_data(_cfg(tmp_path), []).status == "ok"  # the tiny model's synthetic set


def test_overlap_check_counts_training_rows_that_are_evaluation_questions(tmp_path, published):
    cfg = _cfg(tmp_path, None, "evaluation.benchmarks=[mme_realworld_lite]",
               "evaluation.promotion_metric=eval/mme_realworld_lite/overall",
               f"evaluation.data_paths={{mme_realworld_lite: {published['mme_realworld_lite']}}}")  # fmt: skip
    c = pf.check_overlap(cfg, [str(published["train"])])
    assert c.status == "warn" and "2 training row(s)" in c.detail and "mme_realworld_lite 2" in c.detail


# --------------------------------------------------------------------------------------------- resources
def test_disk_check_counts_every_kept_checkpoint(tmp_path, sharded):
    cfg = _cfg(tmp_path, sharded, "checkpoint.keep_last=2", "checkpoint.select_every=1", "algorithm.total_steps=4")
    params = pf.model_parameters(sharded)
    assert 80e6 < params < 83e6  # the weight index's total size / 2 bytes (bf16)
    assert pf.checkpoints_kept(cfg) == 6
    need = params * (4 + 8 + 4) * 6
    assert pf.check_disk(cfg, free_bytes=need + 1).status == "ok"
    c = pf.check_disk(cfg, free_bytes=need - 1)
    assert c.status == "fail" and "6 checkpoint(s)" in c.detail and "state_dir" in c.fix


def test_tracking_check_writes_to_the_store_and_names_an_unreachable_one(tmp_path):
    assert pf.check_tracking(_cfg(tmp_path)).status == "ok"
    cfg = _cfg(tmp_path, None, "tracking.mlflow_tracking_uri=http://user:secret@127.0.0.1:9")
    c = pf.check_tracking(cfg)
    assert c.status == "fail" and "secret" not in c.detail and "127.0.0.1:9" in c.detail


def test_memory_check_on_a_gpu_of_a_given_size(tmp_path, sharded, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cfg = _cfg(tmp_path, sharded, "rollout.engine=vllm", "deepspeed.zero_stage=3", "deepspeed.bf16=true",
               "model.dtype=bfloat16", "rollout.gpu_memory_utilization=0.5")  # fmt: skip
    assert pf.check_memory(cfg, gpu_bytes=80 * 2**30).status == "ok"
    c = pf.check_memory(cfg, gpu_bytes=150 * 2**20)  # 75 MiB for 160 MB of bf16 weights
    assert c.status == "fail" and "gpu_memory_utilization" in c.fix


# ------------------------------------------------------------------------------------------- the command
def test_mgpo_run_stops_before_any_stage_when_preflight_fails(tmp_path, sharded):
    """A real model without training data: `mgpo run` refuses in seconds, starts no stage, writes no run."""
    cmd = [sys.executable, "-m", "mgpo_cli", "run", "--preset", "tiny-cpu", "--set", f"state_dir={tmp_path}",
           "--set", f"model.path={sharded}"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "preflight found 1 problem(s); nothing was started" in p.stderr and "--input" in p.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "datasets").exists()
    q = subprocess.run([sys.executable, "-m", "mgpo_cli", "preflight", "--preset", "tiny-cpu", "--set",
                        f"state_dir={tmp_path}", "--skip", "hosts"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)  # fmt: skip
    assert q.returncode == 0 and "0 failed" in q.stdout, q.stdout + q.stderr


def test_the_vllm_engine_refuses_an_unsupported_version_with_the_fix():
    from mgpo_core.rollout.vllm_version import require_supported_vllm

    require_supported_vllm("0.32.0")
    with pytest.raises(RuntimeError, match=r"pip install 'vllm==0\.32\.\*'"):
        require_supported_vllm("0.33.0")


def test_benchmarks_check_opens_no_image_outside_the_benchmarks_root(tmp_path):
    """Preflight reads the first rows as evaluation does: an image path escaping the data's folder is dropped
    (path_outside_root), so a file whose rows all escape fails the check instead of being opened."""
    outside = tmp_path / "outside"
    outside.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64)).save(outside / "secret.png")
    bench = tmp_path / "bench"
    bench.mkdir()
    items = [{"Question_id": f"q{i}", "Question Type": "Multiple Choice", "Image": "../outside/secret.png",
              "Text": "Q?", "Answer choices": ["(A) a", "(B) b"], "Ground truth": "A", "Task": "Perception",
              "Subtask": "s", "Category": "c", "Dataset": "d"} for i in range(3)]  # fmt: skip
    (bench / "lite.json").write_text(json.dumps(items))
    cfg = _cfg(tmp_path, None, "evaluation.benchmarks=[mme_realworld_lite]",
               "evaluation.promotion_metric=eval/mme_realworld_lite/overall",
               f"evaluation.data_paths={{mme_realworld_lite: {bench / 'lite.json'}}}")  # fmt: skip
    c = pf.check_benchmarks(cfg)
    assert c.status == "fail" and "path_outside_root" in c.detail
