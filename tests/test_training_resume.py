"""Exact resume: SIGKILL at random points and at every boundary, restart, and get the weights of an uninterrupted run.

Each run is a real training process (real DeepSpeed on the CPU accelerator, real HF rollouts of the tiny model,
a real MLflow SQLite store) started the way the pipeline starts it; kills hit the whole process group.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
FAULT_HOOKS = Path(__file__).parent / "fault_hooks"

FAST = [
    "algorithm.total_steps=4",
    "algorithm.prompts_per_step=2",
    "algorithm.mini_batch_prompts=1",
    "algorithm.micro_batch_size=2",
    "rollout.n=2",
    "rollout.max_new_tokens_turn1=6",
    "rollout.max_new_tokens_turn2=4",
    "rollout.min_pixels=3136",
    "rollout.max_pixels=12544",
    "rollout.engine=hf",
    "data.synthetic_train=4",  # 2 prompts a step: an epoch ends after step 2
    "data.synthetic_width=448",
    "data.synthetic_height=336",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=2",
]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


def _cmd(run_dir: Path, state_dir: Path, extra: list[str]) -> list[str]:
    sets = [
        *FAST,
        f"state_dir={state_dir}",
        f"tracking.mlflow_tracking_uri=sqlite:///{state_dir}/mlflow.db",
        *extra,
    ]
    cmd = [
        sys.executable,
        "-m",
        "mgpo_core.training.entry",
        "--config",
        "tiny-cpu",
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _env(fault: str | None = None) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.pop("MGPO_FAULT", None)
    if fault:
        # The crash hooks live in tests/fault_hooks (a sitecustomize), not in the trainer: put them on the path.
        env["MGPO_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULT_HOOKS), env.get("PYTHONPATH")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run(
    run_dir: Path, state_dir: Path, *, fault: str | None = None, extra: list[str] = (), timeout: int = 300
):
    p = subprocess.run(
        _cmd(run_dir, state_dir, list(extra)),
        env=_env(fault),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    return p


def kill_when(run_dir: Path, state_dir: Path, min_journal_lines: int, extra_delay: float) -> int:
    """Start a run, wait until it logged ``min_journal_lines`` steps, wait a bit more, SIGKILL its process group."""
    p = subprocess.Popen(
        _cmd(run_dir, state_dir, []),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    journal = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        lines = len(journal.read_text().splitlines()) if journal.exists() else 0
        if lines >= min_journal_lines:
            break
        time.sleep(0.05)
    time.sleep(extra_delay)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    return p.wait(timeout=30)


def kill_at(run_dir: Path, state_dir: Path, seconds: float) -> int:
    """Start a run and SIGKILL its process group ``seconds`` after the start, whatever it is doing then
    (imports, model loading, DeepSpeed's JIT-op load, a step, a checkpoint)."""
    p = subprocess.Popen(
        _cmd(run_dir, state_dir, []),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return p.wait(timeout=30)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "hf_export" / "model.safetensors"))


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, state_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    t0 = time.monotonic()
    p = run(run_dir, state_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir / "wall_s").write_text(f"{time.monotonic() - t0:.1f}")
    return run_dir


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs from the uninterrupted run"


def test_training_really_moves_the_weights(reference_run, state_dir):
    from mgpo_core.modeling.tiny import tiny_model_dir

    init = load_file(str(tiny_model_dir(state_dir / "models", 0) / "model.safetensors"))
    final = weights(reference_run)
    moved = [k for k in final if not torch.equal(init[k], final[k])]
    assert len(moved) > 0.5 * len(final), "most parameter tensors should change after 4 RL steps"
    m = manifest(reference_run)
    assert m["status"] == "completed" and m["steps_done"] == 4 and m["steps_run_this_process"] == 4


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, state_dir, reference_run):
    rng = random.Random(1234)
    run_dir = tmp_path / "killed"
    # 1) killed mid-checkpoint-write (DeepSpeed files written, not yet renamed into place)
    p = run(run_dir, state_dir, fault="checkpoint-written:2")
    assert p.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / ".tmp-step-000002").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000001"
    # 2) killed at a uniformly random wall-clock moment from process start (start-up included: imports,
    #    loading, DeepSpeed's JIT-op lock), then at a random moment inside a step (after 2 logged steps)
    kill_at(run_dir, state_dir, rng.uniform(0.0, float((reference_run / "wall_s").read_text())))
    kill_when(run_dir, state_dir, min_journal_lines=3, extra_delay=rng.uniform(0.0, 1.5))
    # 3) killed between the rename and the update of "latest"
    p = run(run_dir, state_dir, fault="checkpoint-renamed:4")
    if p.returncode == 0:  # the random kill landed late: step 4 was already done; nothing left to kill
        pass
    else:
        assert p.returncode == -signal.SIGKILL
    p = run(run_dir, state_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert manifest(run_dir)["steps_done"] == 4
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "stale temp checkpoints were not cleaned"
    _assert_same_weights(reference_run, run_dir)


@pytest.mark.parametrize(
    ("boundary", "remaining"),
    [("checkpoint-done:1", 3), ("checkpoint-done:2", 2), ("checkpoint-done:4", 0)],
    ids=["first-step", "epoch-end", "last-step"],
)
def test_resume_at_a_boundary_trains_exactly_the_remaining_steps(
    tmp_path, state_dir, reference_run, boundary, remaining
):
    run_dir = tmp_path / "boundary"
    p = run(run_dir, state_dir, fault=boundary)
    assert p.returncode == -signal.SIGKILL
    p = run(run_dir, state_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    m = manifest(run_dir)
    assert m["steps_run_this_process"] == remaining and m["steps_done"] == 4
    if remaining:
        _assert_same_weights(reference_run, run_dir)


def test_mlflow_run_has_every_step_and_the_design_metrics(reference_run, state_dir):
    from mlflow.tracking import MlflowClient

    m = manifest(reference_run)
    client = MlflowClient(f"sqlite:///{state_dir}/mlflow.db")
    run = client.get_run(m["mlflow_run_id"])
    keys = set(run.data.metrics)
    wanted = {
        "reward/mean",
        "reward/std",
        "rollout/accuracy",
        "rollout/valid_box_ratio",
        "rollout/response_len_turn1",
        "rollout/response_len_turn2",
        "rollout/truncation_rate",
        "rollout/zero_adv_group_share",
        "loss/policy",
        "loss/kl",
        "loss/entropy",
        "actor/clip_frac",
        "optim/grad_norm",
        "optim/lr",
        "rollout/logprob_gap",
        "collapse/valid_box_ratio_drop",
        "collapse/alarm",
        "timing/rollout_s",
        "timing/old_ref_logprobs_s",
        "timing/update_s",
        "timing/weight_sync_s",
        "timing/checkpoint_s",
        "perf/generated_tokens_per_s",
        "perf/peak_rss_mb",
    }
    assert wanted <= keys, f"missing: {sorted(wanted - keys)}"
    assert any(k.startswith("rollout/box_reason/") for k in keys)
    hist = client.get_metric_history(run.info.run_id, "reward/mean")
    assert sorted(h.step for h in hist) == [1, 2, 3, 4]
    assert run.data.params["algorithm.kl_coef"] == "0.01"
    assert run.data.tags["mgpo.config_hash"] == m["config_hash"]


def test_a_stale_jit_lock_left_by_a_killed_start_does_not_hang_the_next_one(tmp_path, state_dir, monkeypatch):
    """A SIGKILL while torch JIT-builds DeepSpeed's shared-memory op leaves its ``lock`` file, and torch waits on
    it forever. ``infra/setup_env.sh`` compiles the op into the DeepSpeed install (``DS_BUILD_SHM_COMM=1``), so no
    start loads it through the JIT: a lock left there is never looked at, and training starts (here: one step)."""
    from deepspeed.git_version_info import installed_ops

    assert installed_ops.get("deepspeed_shm_comm"), "DeepSpeed lacks its prebuilt CPU op: run bash infra/setup_env.sh"
    ext = tmp_path / "torch_extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"  # torch's build folder with TORCH_EXTENSIONS_DIR set
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # the killed start was an hour ago
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    p = run(
        tmp_path / "after-stale-lock",
        state_dir,
        extra=["algorithm.total_steps=1", "checkpoint.export_hf=false", "deepspeed.startup_timeout_s=240"],
        timeout=400,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "built at run time" not in p.stderr  # the op came from the install, not the JIT
    assert lock.exists() and sorted(x.name for x in lock.parent.iterdir()) == ["lock"]  # nothing touched it
