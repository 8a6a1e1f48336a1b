"""Two runs of the same stage with the same cache key execute it once: the second waits, then reads the result.

A manual run beside the nightly computes the same key for a stage (same config, data and code); without a lock
both would train. Each stage task's cache policy runs its transaction at Prefect's ``SERIALIZABLE`` isolation
level with the lock manager below: the first run takes the key's lock before it looks for a stored result and
holds it until the result is committed (or the stage fails); the second waits on the lock, then finds the
committed result and returns it from cache.

Prefect's ``FileSystemLockManager`` writes lock files without an expiry, so a run killed while it holds a lock
(``kill -9``, a lost node) would make every later run wait forever. This one records who holds the lock (host,
pid, process start time) beside it, and a lock whose holder no longer runs on this host is broken, with a
notice. The lock files live beside the persisted results (``<PREFECT_LOCAL_STORAGE_PATH>/../locks``), resolved
when a lock is taken, so one process can run pipelines of several state folders.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager

#: A lock file without its owner record for this long was left by a holder that died while taking it.
ORPHAN_AFTER_S = 60.0


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (None when it does not exist): a pid reused later has another start time."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


class StageLockManager(FileSystemLockManager):
    """A ``FileSystemLockManager`` whose directory follows the current result storage and whose locks of dead
    holders are broken (see the module docstring)."""

    def __init__(self, lock_files_directory: Path | None = None) -> None:  # noqa: D107
        self._fixed = lock_files_directory
        self._locks = {}

    @property
    def lock_files_directory(self) -> Path:  # type: ignore[override]
        if self._fixed is not None:
            return Path(self._fixed).expanduser().resolve()
        from prefect.settings import get_current_settings

        return Path(get_current_settings().results.local_storage_path).expanduser().resolve().parent / "locks"

    def _get_lock_info(self, key: str, use_cache: bool = True) -> Any:
        """As Prefect's, but a lock file another process is writing right now (empty or partial) holds."""
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:
            return {"holder": "", "expiration": None, "path": self._lock_path_for_key(key)}

    def _owner_path(self, key: str) -> Path:
        return self._lock_path_for_key(key).with_suffix(".owner")

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:  # fmt: skip
        if self.is_locked(key) and not self.is_lock_holder(key, holder):
            owner = self._owner(key) or {}
            _notice(
                f"another run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}) is executing this stage "
                f"with the same inputs; waiting for it, then using its result"
            )
        got = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if got:
            self._owner_path(key).write_text(json.dumps({**_me(), "holder": holder}))
        return got

    def release_lock(self, key: str, holder: str) -> None:
        # The lock first, its owner record after: Prefect's release asks is_locked, which would take a lock
        # without an owner record older than ORPHAN_AFTER_S for an orphan and break it (every stage longer
        # than a minute then failed at commit with "No lock for transaction").
        super().release_lock(key, holder)
        self._owner_path(key).unlink(missing_ok=True)

    def _owner(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._owner_path(key).read_text())
        except (OSError, ValueError):
            return None

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache=use_cache):
            return False
        owner = self._owner(key)
        if owner is None:  # being taken right now; or its holder died between the two writes (a minute ago)
            lock = self._lock_path_for_key(key)
            try:
                orphan = time.time() - lock.stat().st_mtime > ORPHAN_AFTER_S
            except OSError:
                return False
            if not orphan:
                return True
            owner = {"pid": "?", "host": socket.gethostname()}
        elif owner.get("host") != socket.gethostname():
            return True  # held on another host: its processes cannot be checked from here, so it holds
        elif _start_time(int(owner["pid"])) == owner.get("started"):
            return True
        _notice(f"breaking the lock of stage key {key}: its holder (pid {owner['pid']}) is no longer running")
        self._lock_path_for_key(key).unlink(missing_ok=True)
        self._owner_path(key).unlink(missing_ok=True)
        self._locks.pop(key, None)
        return False


def _notice(msg: str) -> None:
    from tasks.console import notice

    notice(msg)


def serializable(policy: CachePolicy, lock_manager: StageLockManager | None = None) -> CachePolicy:
    """``policy`` at the SERIALIZABLE isolation level with a ``StageLockManager``."""
    return policy.configure(isolation_level="SERIALIZABLE", lock_manager=lock_manager or StageLockManager())
