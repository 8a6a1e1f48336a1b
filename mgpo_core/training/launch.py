"""Start the training process group (plain python, torchrun or the deepspeed launcher) and stream its log.

The caller (``mgpo train`` or the Prefect task) never touches ``torch.distributed``: it writes the config to the
run directory, launches the group in its own session (so a cancel kills every rank), forwards each log line to a
callback, and returns the manifest the trainer wrote. Relaunching with the same run directory resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgpo_core.config import MGPOConfig, save_config


class TrainingFailed(RuntimeError):
    """The training process group exited with an error; ``log_tail`` holds its last lines."""

    def __init__(self, returncode: int, log_tail: str, run_dir: Path) -> None:
        super().__init__(
            f"training exited with code {returncode} (run directory {run_dir}; relaunching resumes from the last "
            f"checkpoint). Last log lines:\n{log_tail}"
        )
        self.returncode, self.log_tail, self.run_dir = returncode, log_tail, run_dir


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(cfg: MGPOConfig, config_path: Path, run_dir: Path, mlflow_run_id: str | None) -> list[str]:
    d = cfg.deepspeed
    entry = ["--config", str(config_path), "--run-dir", str(run_dir), "--no-progress"]
    if mlflow_run_id:
        entry += ["--mlflow-run-id", mlflow_run_id]
    if d.launcher == "python":
        return [sys.executable, "-m", "mgpo_core.training.entry", *entry]
    if d.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={d.num_gpus}",
            "--master_port=0",
            "-m",
            "mgpo_core.training.entry",
            *entry,
        ]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(d.num_gpus)]
    if d.hostfile:
        cmd += ["--hostfile", d.hostfile]
    return [*cmd, "--module", "mgpo_core.training.entry", *entry]


def launch_training(
    cfg: MGPOConfig,
    run_dir: str | Path,
    *,
    mlflow_run_id: str | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run training to completion in a launched process group; returns ``run_dir/manifest.json``'s content."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, run / "launch-config.yaml")
    cmd = launch_command(cfg, config_path, run, mlflow_run_id)
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    tail: deque[str] = deque(maxlen=60)
    with (run / "train.log").open("a") as logf:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            bufsize=1,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                tail.append(line.rstrip("\n"))
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            rc = proc.wait(timeout=timeout_s)
        except BaseException:
            # Cancelled or timed out: take the whole group down; a relaunch resumes from the last checkpoint.
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
    if rc != 0:
        raise TrainingFailed(rc, "\n".join(tail), run)
    return json.loads((run / "manifest.json").read_text())
