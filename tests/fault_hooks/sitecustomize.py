"""Crash-test hooks, loaded only by Python processes started with this folder on ``PYTHONPATH`` (the crash tests
put it there; production never does, and the multi-node launcher never forwards ``MGPO_FAULT``/``MGPO_HANG``).

``MGPO_FAULT=<point>:<step>`` kills the process with SIGKILL at that named point of the trainer;
``MGPO_HANG=<point>:<step>`` makes it hang there forever (as a hung collective would). The points are the
``fault_point`` calls of ``mgpo_core.training`` (``rollout``, ``step-done``, ``checkpoint-written``, ...).
"""

from __future__ import annotations

import os
import signal
import time


def _crash_hook(name: str, step: int) -> None:
    here = f"{name}:{step}"
    if os.environ.get("MGPO_HANG") == here:
        while True:
            time.sleep(3600)
    if os.environ.get("MGPO_FAULT") == here:
        os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("MGPO_FAULT") or os.environ.get("MGPO_HANG"):
    # Only then: importing the trainer's checkpoint module pulls in torch, which plain processes need not pay for.
    from mgpo_core.training import checkpoint as _checkpoint

    if _crash_hook not in _checkpoint.POINT_HOOKS:
        _checkpoint.POINT_HOOKS.append(_crash_hook)
