"""One plain process or one rank of a ``deepspeed``/``torchrun`` group: rank and world from the environment,
rank-0-first sections, and a scalar all-reduce."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int


def init_distributed() -> DistInfo:
    """Join the launcher's process group, or make a one-process group for plain ``python``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    if not torch.distributed.is_initialized():
        if os.environ["DS_ACCELERATOR"] == "cpu":
            warn_if_cpu_op_not_prebuilt()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    )


def warn_if_cpu_op_not_prebuilt() -> bool:
    """On CPU DeepSpeed starts through its shared-memory communication op. ``infra/setup_env.sh`` compiles it into
    the DeepSpeed install; without that, every start loads it through torch's JIT extension loader (a ~30 s build
    the first time), whose ``lock`` file a start killed at that moment leaves behind, and every later start then
    waits on it forever. Says so (once, on stderr) and returns True when the op is not prebuilt."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:  # pragma: no cover - a DeepSpeed without the record
        return False
    if installed_ops.get("deepspeed_shm_comm"):
        return False
    import sys

    print(  # noqa: T201 - goes to the training log, where a user looks for a slow or hung start
        "mgpo: DeepSpeed was installed without its CPU communication op, so it is built at run time (torch JIT); "
        "a start killed during that build can leave a 'lock' file in the torch extensions folder "
        "(deepspeed_shm_comm/lock) that hangs later starts. Install it with bash infra/setup_env.sh "
        "(DS_BUILD_SHM_COMM=1).",
        file=sys.stderr,
        flush=True,
    )
    return True


def rank0_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 first (it may build or download-free prepare shared files), then on the others."""
    dist = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if dist and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return fn()
    out = fn()
    if dist:
        torch.distributed.barrier()
    return out


def all_reduce_sum(x: float, device: torch.device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return float(t.item())


def broadcast_from_rank0(obj: Any, device: torch.device | None = None) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without a process group of several ranks.
    ``device``: this rank's device (NCCL sends through it)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=device)
    return box[0]
