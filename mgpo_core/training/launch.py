"""Start the training process group (plain python, torchrun or the deepspeed launcher) and stream its log.

The caller (``mgpo train`` or the Prefect task) never touches ``torch.distributed``: it writes the config to the
run directory, launches the group in its own session (so a cancel kills every rank), forwards each log line to a
callback, and returns the manifest the trainer wrote. Relaunching with the same run directory resumes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgpo_core.config import MGPOConfig, save_config
from mgpo_core.config.secrets import redact


class TrainingFailed(RuntimeError):
    """The training process group exited with an error; ``log_tail`` holds its last lines."""

    def __init__(self, returncode: int, log_tail: str, run_dir: Path) -> None:
        super().__init__(
            f"training exited with code {returncode} (run directory {run_dir}; relaunching resumes from the last "
            f"checkpoint). Last log lines:\n{log_tail}"
        )
        self.returncode, self.log_tail, self.run_dir = returncode, log_tail, run_dir


class StepWatcher:
    """Follows ``metrics.jsonl`` (one JSON line per finished step, written by rank 0) from a thread."""

    def __init__(self, journal: Path, on_step: Callable[[int, dict[str, float]], None] | None, poll_s: float = 1.0):
        import threading

        self.journal, self.on_step, self.poll_s = journal, on_step, poll_s
        self.offset = journal.stat().st_size if journal.exists() else 0  # only steps of this launch
        self.last_step: int | None = None
        self.last_progress = time.monotonic()
        self.started_wall = time.time()
        self.pgid: int | None = None
        self.stall_s: float | None = None
        self.startup_s: float | None = None
        self.last_line: Callable[[], list[str]] = list
        self.stalled: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mgpo-step-watcher", daemon=True)

    def watch_stall(
        self,
        pgid: int,
        stall_s: float | None,
        startup_s: float | None,
        last_line: Callable[[], list[str]],
    ) -> None:
        """Kill process group ``pgid`` when no step is journaled for ``stall_s`` (``startup_s`` before the
        first step of this launch); ``stalled`` then holds (phase, seconds waited)."""
        self.pgid, self.stall_s, self.startup_s, self.last_line = pgid, stall_s, startup_s, last_line

    def _check_stall(self) -> None:
        if self.pgid is None or self.stalled is not None:
            return
        limit = self.startup_s if self.last_step is None else self.stall_s
        waited = time.monotonic() - self.last_progress
        if limit is None or waited < limit:
            return
        last = (self.last_line() or [""])[-1].strip()[:200]
        ranks = self._phases()
        if ranks:
            phase = "in " + "; ".join(f"rank {r}: {what}" for r, what in ranks)
        elif self.last_step is None:
            phase = "starting up (before the first step: model loading, JIT builds, engine start-up)"
        else:
            phase = f"in step {self.last_step + 1} (rollout, log-probs, update or checkpoint)"
        if last:
            phase += f"; last output: {last!r}"
        self.stalled = (phase, waited)
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _phases(self) -> list[tuple[int, str]]:
        """What each rank last said it was doing (``phase-rank<r>`` files the trainer writes) during this launch."""
        out = []
        for f in sorted(self.journal.parent.glob("phase-rank*")):
            try:
                if f.stat().st_mtime < self.started_wall:
                    continue  # left by an earlier launch
                out.append((int(f.name.removeprefix("phase-rank")), f.read_text().strip()))
            except (OSError, ValueError):
                continue
        return sorted(out)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()
            self._check_stall()

    def poll(self) -> None:
        try:
            with self.journal.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for raw in chunk[: end + 1].splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            self.last_step, self.last_progress = int(rec.get("step", 0)), time.monotonic()
            if self.on_step is not None:
                try:
                    self.on_step(self.last_step, rec.get("metrics", {}))
                except Exception:  # noqa: BLE001 - progress display must never stop training
                    pass


class TrainingStalled(TrainingFailed):
    """No RL step finished within the stall timeout; the process group was ended. Retriable (tasks/retry.py)."""

    def __init__(self, phase: str, waited_s: float, log_tail: str, run_dir: Path) -> None:
        RuntimeError.__init__(
            self,
            f"training stalled: no RL step finished for {waited_s:.0f} s while {phase}; the process group was "
            f"ended (run directory {run_dir}; relaunching resumes from the last checkpoint; the limit is "
            f"deepspeed.stall_timeout_s / deepspeed.startup_timeout_s). Last log lines:\n{log_tail}",
        )
        self.returncode, self.log_tail, self.run_dir, self.phase = -9, log_tail, run_dir, phase


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
        if check_hostfile(Path(d.hostfile)) > 1:  # one host: DeepSpeed starts it locally, without pdsh or a shell
            entry = remote_arguments(entry)
        cmd += ["--hostfile", d.hostfile]
    if d.ssh_port is not None:
        cmd += ["--ssh_port", str(d.ssh_port)]
    if d.master_addr is not None:
        cmd += ["--master_addr", d.master_addr]
    if d.master_port is not None:
        cmd += ["--master_port", str(d.master_port)]
    return [*cmd, "--module", "mgpo_core.training.entry", *entry]


class UnsafeLaunch(ValueError):
    """A multi-node launch whose arguments or hosts a remote shell would misread; the message names the fix."""


_PLAIN_ARG = re.compile(r"[\w./@%+=:,-]+")


def remote_arguments(args: list[str]) -> list[str]:
    """``args`` as they must be handed to DeepSpeed's pdsh runner, which joins them into ONE command line for each
    host's login shell and quotes only arguments holding a space (and then in double quotes, inside which ``$(..)``
    and backticks still run). Config-time checks (config/safety.py) already keep shell characters out of the run
    name and the state folder; here every argument is ``shlex.quote``-d as a second wall, and whitespace or control
    characters (which the runner's own quoting would corrupt) are refused."""
    out = []
    for arg in args:
        if not arg or any(c.isspace() or not c.isprintable() for c in arg):
            raise UnsafeLaunch(
                f"multi-node launch argument {arg!r} holds whitespace or control characters, which DeepSpeed's "
                "pdsh runner cannot pass to the remote shell intact; use a state_dir (and run directory) whose "
                "absolute path has no spaces"
            )
        out.append(arg if _PLAIN_ARG.fullmatch(arg) else shlex.quote(arg))
    return out


_HOST_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s+slots=(\d+)")


def check_hostfile(path: Path) -> int:
    """The number of hosts in ``path``; refuses a hostfile whose host names pdsh/ssh could read as options or a shell
    could interpret (a host such as ``-oProxyCommand=...``). Blank and ``#`` lines are skipped as DeepSpeed skips
    them."""
    hosts = 0
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UnsafeLaunch(f"deepspeed.hostfile {path}: cannot read it ({err.strerror}); check the path") from None
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text and not _HOST_LINE.fullmatch(text):
            raise UnsafeLaunch(
                f"deepspeed.hostfile {path}:{n}: {line.strip()!r} is not '<host> slots=<n>' with a plain host name "
                "(letters, digits, '.', '_', '-', not starting with '-'); fix that line"
            )
        hosts += bool(text)
    return hosts


# What the ranks on the hostfile's hosts need from the launching node's environment. DeepSpeed itself forwards
# only names starting with MLFLOW, PYTHON, MV2, UCX (and the accelerator's, e.g. NCCL on CUDA); a rank started
# over SSH gets a login shell's environment, without DS_ACCELERATOR (CPU runs) or the offline switches (it would
# reach for the hub), and with the login shell's PATH. PATH is passed as it is here, not rebuilt: torch runs the
# `ninja` it finds on PATH for DeepSpeed's JIT ops, and two ninja versions (1.11 vs 1.12+) hash build commands
# differently, so ranks with another PATH than a local launch rebuilt the op at every alternation (~30 s each).
# Named one by one, not by prefix (HF_*, VLLM_*): the values travel on the remote command line, visible to `ps`,
# and tokens must not.
FORWARDED_ENV = (
    "PATH",
    "DS_ACCELERATOR",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TORCH_EXTENSIONS_DIR",
    "CUDA_HOME",
    "GLOO_SOCKET_IFNAME",
    "VLLM_LOGGING_LEVEL",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
)
FORWARDED_PREFIXES = ("MGPO_", "NCCL_")
NEVER_FORWARDED = ("MGPO_FAULT", "MGPO_HANG", "MGPO_STAGE_HOOKS")
"""Test-only switches (the crash and stage hooks of tests/): a remote rank never gets them, whatever the prefix."""


def _env_file_lines(path: Path) -> list[str]:
    """The ``KEY=VALUE`` lines of a DeepSpeed env file (blank lines dropped: DeepSpeed's reader fails on them)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if "=" in line and line.strip()]


def write_deepspeed_env(cfg: MGPOConfig, run_dir: Path, env: dict[str, str]) -> Path:
    """Write ``run_dir/deepspeed_env``: the variables every rank on every host gets, for DeepSpeed's multi-node
    runner (which reads the file named by ``DS_ENV_FILE``, set by the caller; by default ``~/.deepspeed_env``).

    Content: the built-in set (``FORWARDED_ENV``: ``PATH``, ``DS_ACCELERATOR``, the offline switches, ...;
    ``MGPO_*``, ``NCCL_*``) and ``deepspeed.env_forward``, each with its value here when set here; then the lines
    of the user's own ``~/.deepspeed_env`` and ``./.deepspeed_env`` (or the file a ``DS_ENV_FILE`` of theirs
    names: what DeepSpeed would read without us), which win over ours. A value DeepSpeed cannot pass through its ``export KEY="VALUE"``
    (quotes, ``$``, backslashes, newlines) is skipped with a note in the training log."""
    lines: list[str] = []
    skipped: list[str] = []
    wanted = [*FORWARDED_ENV, *cfg.deepspeed.env_forward]
    names = [n for n in env if (n in wanted or n.startswith(FORWARDED_PREFIXES)) and n not in NEVER_FORWARDED]
    for name in sorted(set(names)):
        value = env[name]
        if any(c in value for c in '"`$\\\n'):
            skipped.append(name)
            continue
        lines.append(f"{name}={value}")
    own_name = env.get("DS_ENV_FILE", ".deepspeed_env")  # the user's own file, read as DeepSpeed would read it
    for own in dict.fromkeys((Path.home() / own_name, Path(own_name))):
        lines += _env_file_lines(own)
    path = run_dir / "deepspeed_env"
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    # 0600 from creation: forwarded values (and the user's own env file's lines) may include credentials.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))
    tmp.replace(path)
    if skipped:
        with (run_dir / "train.log").open("a") as log:
            log.write(f"mgpo: not forwarded to the other hosts (quotes, $, backslashes or newlines): {skipped}\n")
    return path


def launch_training(
    cfg: MGPOConfig,
    run_dir: str | Path,
    *,
    mlflow_run_id: str | None = None,
    on_line: Callable[[str], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run training to completion in a launched process group; returns ``run_dir/manifest.json``'s content.

    ``on_line`` gets every output line of the ranks; ``on_step`` gets ``(step, metrics)`` for every step the
    trainer journals (read from ``metrics.jsonl`` by a watcher thread while the group runs)."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, run / "launch-config.yaml")
    os.chmod(config_path, 0o600)  # the one copy that keeps secrets (config.yaml and MLflow get them masked)
    cmd = launch_command(cfg, config_path, run, mlflow_run_id)
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cfg.deepspeed.launcher == "deepspeed" and cfg.deepspeed.hostfile:
        # Multi-node: ranks start in an SSH login shell on each host; DeepSpeed exports this file's variables there.
        env["DS_ENV_FILE"] = str(write_deepspeed_env(cfg, run, env))
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
        watcher = StepWatcher(run / "metrics.jsonl", on_step)
        watcher.watch_stall(
            proc.pid, cfg.deepspeed.stall_timeout_s, cfg.deepspeed.startup_timeout_s, lambda: list(tail)[-1:]
        )
        watcher.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = redact(line)  # a rank that prints a URI with credentials or an expanded secret
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
        finally:
            watcher.stop()
    if watcher.stalled is not None:
        phase, waited = watcher.stalled
        raise TrainingStalled(phase, waited, "\n".join(tail), run)
    if rc != 0:
        raise TrainingFailed(rc, "\n".join(tail), run)
    return json.loads((run / "manifest.json").read_text())
