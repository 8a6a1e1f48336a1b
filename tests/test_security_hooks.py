"""Fault injection lives in tests/, not in production, and checkpoints never unpickle (issue 26, items 6 and 7)."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mgpo_core.config import load_config
from mgpo_core.training import checkpoint as ckpt
from mgpo_core.training.launch import write_deepspeed_env

FAULT_HOOKS = Path(__file__).parent / "fault_hooks"
_POINT = "from mgpo_core.training.checkpoint import fault_point; fault_point('rollout', 2); print('survived')"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("MGPO_FAULT", "MGPO_HANG", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_production_code_ignores_the_crash_switches():
    """MGPO_FAULT set, but without the test hooks on the path nothing happens at the point."""
    p = _python(_POINT, MGPO_FAULT="rollout:2")
    assert (p.returncode, p.stdout.strip()) == (0, "survived"), p.stderr


def test_the_test_hooks_kill_at_the_named_point_only():
    killed = _python(_POINT, MGPO_FAULT="rollout:2", PYTHONPATH=str(FAULT_HOOKS))
    assert killed.returncode == -signal.SIGKILL and "survived" not in killed.stdout
    other = _python(_POINT, MGPO_FAULT="rollout:3", PYTHONPATH=str(FAULT_HOOKS))
    assert (other.returncode, other.stdout.strip()) == (0, "survived"), other.stderr


def test_crash_switches_are_never_forwarded_to_remote_ranks(tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("tiny-cpu", ["deepspeed.launcher=deepspeed", f"deepspeed.hostfile={hostfile}"])
    env = {"MGPO_FAULT": "rollout:1", "MGPO_HANG": "rollout:2", "MGPO_STAGE_HOOKS": "x:y", "MGPO_KEEP": "1"}
    path = write_deepspeed_env(cfg, tmp_path, env)
    assert path.read_text().splitlines() == ["MGPO_KEEP=1"]
    assert path.stat().st_mode & 0o777 == 0o600, "forwarded values may be credentials"


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist()) == want


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PWNED_AT"]),))


def test_a_pickled_rng_file_is_refused_without_running_it(tmp_path, monkeypatch):
    """A tampered checkpoint file (a pickle whose loading touches a file) is refused and its code never runs;
    ``load_checkpoint`` reads every rank's RNG file through ``read_rng_state``."""
    target = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_AT", str(target))
    rng_file = tmp_path / "rng_rank000.pt"
    with open(rng_file, "wb") as f:
        pickle.dump({"python": _Payload()}, f)
    with pytest.raises(RuntimeError, match="cannot be read as plain tensors"):
        ckpt.read_rng_state(rng_file)
    assert not target.exists()
