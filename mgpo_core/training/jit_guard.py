"""A training start-up that a SIGKILL cannot hang: clear torch's JIT-build lock when its holder is gone.

On CPU every DeepSpeed start loads its shared-memory comm op through torch's extension loader, which creates a
``lock`` file in the op's build folder (``<torch extensions>/deepspeed_shm_comm/lock``) while it checks or builds
the op, and deletes it afterwards. A process killed inside that window leaves the file behind, and every later
start polls it forever. torch's lock records no owner, so our ranks add one that the kernel keeps honest: each
rank holds a shared ``flock`` on ``<build folder>/.mgpo-guard`` while it loads the op. A start that can take the
guard EXCLUSIVELY knows no rank of ours is inside the window, so a ``lock`` file then present is stale: it is
removed (and logged) before the load. flock is released by the kernel when its holder dies, however it dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

OP_NAME = "deepspeed_shm_comm"


def op_build_dir(name: str = OP_NAME) -> Path | None:
    """torch's build folder of JIT extension ``name`` (created if missing), or None when it cannot be known."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False))
    except Exception:  # noqa: BLE001 - a torch without it: no guard, the old behaviour
        return None


def stale_after_s() -> float:
    """A lock file no rank of ours holds is left alone this long (a process outside our ranks — a notebook, a
    benchmark — may be checking or building the op; a first build takes ~30 s on 2 cores)."""
    return float(os.environ.get("MGPO_JIT_LOCK_STALE_S", "120"))


def clear_stale_lock(build_dir: Path) -> bool:
    """Called with the guard held exclusively: remove a leftover ``lock``; True when one was removed."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= stale_after_s():
            lock.unlink(missing_ok=True)
            print(  # noqa: T201 - goes to the training log, where a user looks for a slow start
                f"mgpo: removed a stale torch JIT-build lock {lock} ({age:.0f} s old, no process holds it: "
                "left by a killed start)",
                file=sys.stderr,
                flush=True,
            )
            log.warning("removed a stale torch JIT-build lock %s", lock)
            return True
        time.sleep(1.0)


@contextlib.contextmanager
def jit_lock_guard(name: str = OP_NAME) -> Iterator[None]:
    """Hold around the code that loads JIT op ``name`` (DeepSpeed's ``init_distributed`` on CPU)."""
    build_dir = op_build_dir(name)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        fcntl = None  # type: ignore[assignment]
    if build_dir is None or fcntl is None:
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir / ".mgpo-guard", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            clear_stale_lock(build_dir)  # nobody of ours is loading: a lock file now is stale
        except BlockingIOError:
            pass  # another rank is inside the window: its lock is real, wait for it as torch does
        fcntl.flock(fd, fcntl.LOCK_SH)  # converts EX to SH, or joins the other holders
        yield
    finally:
        os.close(fd)  # releases the flock
