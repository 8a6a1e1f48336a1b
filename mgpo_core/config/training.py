"""How the trainer runs: `OptimizerConfig`, `DeepSpeedConfig` (engine and launcher) and `CheckpointConfig`."""

from __future__ import annotations

import re
import typing
from typing import Literal

from pydantic import Field, model_validator

from mgpo_core.config.base import PositiveInt, UnitFloat, _Section
from mgpo_core.config.errors import _FieldProblem


class OptimizerConfig(_Section):
    """The optimiser and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimiser handed to DeepSpeed: torch AdamW, or plain SGD (no momentum; for checks that read the gradient
    off the update)."""
    lr: float = Field(1e-6, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = Field(0.01, ge=0.0)
    """Decoupled weight decay."""
    betas: tuple[UnitFloat, UnitFloat] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Max global gradient norm; 0 disables clipping."""
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Optimiser steps of linear warm-up from 0."""


class DeepSpeedConfig(_Section):
    """DeepSpeed engine and the process launcher."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 2 shards optimiser states and gradients, 3 also shards parameters."""
    bf16: bool = False
    """Train in bf16 with fp32 master weights in the optimiser."""
    offload_optimizer: bool = False
    """Keep optimiser states in CPU memory (ZeRO stage >= 1)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO stage 3 only)."""
    config_file: str | None = None
    """DeepSpeed JSON (e.g. under infra/) to start from; the fields above override its entries."""
    launcher: Literal["deepspeed", "torchrun", "python"] = "python"
    """How the training process group is started; "python" runs one process."""
    num_gpus: PositiveInt = 1
    """Processes (GPUs) per node."""
    hostfile: str | None = None
    """DeepSpeed hostfile for multi-node runs (launcher "deepspeed" only): one `<ssh host> slots=<processes>`
    line per node, the first is rank 0's; the ranks are started over SSH (pdsh), see docs/SCALE_OUT.md."""
    ssh_port: typing.Annotated[int, Field(ge=1, le=65535)] | None = None
    """SSH port of the hostfile's hosts (DeepSpeed's `--ssh_port`); null: ssh's own default or ssh config."""
    master_addr: str | None = None
    """Address every rank reaches rank 0 at (DeepSpeed's `--master_addr`); null: DeepSpeed's choice (127.0.0.1
    on one node; with a hostfile the first address `hostname -I` prints on the first host)."""
    master_port: typing.Annotated[int, Field(ge=1, le=65535)] | None = None
    """TCP port of the rendezvous on rank 0's host (DeepSpeed's `--master_port`); null: DeepSpeed's 29500."""
    env_forward: list[str] = []
    """More environment variables (names) whose values on the launching node the ranks on every host get, beside
    the built-in set (DS_ACCELERATOR, offline Hugging Face, thread counts, the virtualenv's PATH, MGPO_*, ...)."""
    stall_timeout_s: typing.Annotated[float, Field(gt=0.0)] | None = 1800.0
    """The train task ends the process group and fails (naming the phase) when no RL step finishes for this long
    after the first one (a hung collective, a stuck rollout); null disables the watch."""
    startup_timeout_s: typing.Annotated[float, Field(gt=0.0)] | None = 3600.0
    """The same watch before the first step (model loading, JIT builds, engine start-up); null disables it."""

    @model_validator(mode="after")
    def _consistent_launch(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise _FieldProblem("needs ZeRO stage 3", self.offload_params,
                                "set deepspeed.zero_stage=3 or deepspeed.offload_params=false", "offload_params")
        if self.offload_optimizer and self.zero_stage == 0:
            raise _FieldProblem("needs ZeRO stage >= 1", self.offload_optimizer,
                                "set deepspeed.zero_stage to 1, 2 or 3", "offload_optimizer")
        if self.launcher == "python" and self.num_gpus > 1:
            raise _FieldProblem("launcher 'python' starts a single process", self.num_gpus,
                                "set deepspeed.launcher=deepspeed (or torchrun), or deepspeed.num_gpus=1",
                                "num_gpus")
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise _FieldProblem(f"is only read by the deepspeed launcher, not {self.launcher!r}", self.hostfile,
                                "set deepspeed.launcher=deepspeed or deepspeed.hostfile=null", "hostfile")
        for name in ("master_addr", "master_port"):
            if getattr(self, name) is not None and self.launcher != "deepspeed":
                raise _FieldProblem(f"is only read by the deepspeed launcher, not {self.launcher!r}",
                                    getattr(self, name), f"set deepspeed.launcher=deepspeed or deepspeed.{name}=null",
                                    name)
        if self.ssh_port is not None and self.hostfile is None:
            raise _FieldProblem("is only used to reach the hosts of a hostfile", self.ssh_port,
                                "set deepspeed.hostfile (and deepspeed.launcher=deepspeed) or deepspeed.ssh_port=null",
                                "ssh_port")
        if self.env_forward and self.hostfile is None:
            raise _FieldProblem("is only used for the ranks of a hostfile's hosts", self.env_forward,
                                "set deepspeed.hostfile (and deepspeed.launcher=deepspeed) or deepspeed.env_forward=[]",
                                "env_forward")
        bad = [n for n in self.env_forward if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise _FieldProblem("holds names that are not environment variable names", bad,
                                "list variable names only, e.g. [NCCL_SOCKET_IFNAME]", "env_forward")
        return self


class CheckpointConfig(_Section):
    """Atomic training checkpoints for exact resume."""

    every_steps: PositiveInt = 10
    """Write a checkpoint every this many RL steps (and after the last one)."""
    keep_last: PositiveInt = 2
    """Checkpoints kept on disk; older ones are deleted."""
    export_hf: bool = True
    """Also export the final policy as a Hugging Face directory (what gets registered in MLflow)."""
    select_every: int = Field(0, ge=0)
    """Checkpoint selection: keep every k-th checkpoint, and after training evaluate each (and the last) on the
    configured benchmarks (greedy, `evaluation.limit`), log `select/<promotion metric>` per step to the training
    run, and register the best one (its step is in the lineage tags). 0 = off: the last checkpoint is registered."""
    select_on: list[str] = []
    """Benchmarks checkpoint selection scores each candidate on, the selection metric being
    ``eval/<first>/overall``; empty = `evaluation.benchmarks` with `evaluation.promotion_metric`. ``validation``
    is the split the filter stage holds out of the training data (`data.validation_rows`): selecting on the
    benchmarks the model is then scored on would report a maximum over checkpoints, not a held-out score."""

    def selection_metric(self, promotion_metric: str) -> str:
        """The metric the best checkpoint maximises."""
        return f"eval/{self.select_on[0]}/overall" if self.select_on else promotion_metric
