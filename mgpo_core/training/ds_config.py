"""DeepSpeed configuration from the MGPO config: a JSON under ``infra/deepspeed/`` (optional) + our batch sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def micro_steps_per_minibatch(cfg, world: int) -> int:  # noqa: ANN001
    """Gradient-accumulation steps: micro-batches in one rank's share of a mini-batch."""
    a = cfg.algorithm
    if a.mini_batch_prompts % world:
        raise ValueError(
            f"algorithm.mini_batch_prompts={a.mini_batch_prompts} is not divisible by the world size {world}; "
            "choose a multiple of the number of ranks"
        )
    episodes = a.mini_batch_prompts // world * cfg.rollout.n
    if episodes % a.micro_batch_size:
        divisors = [d for d in range(1, episodes + 1) if episodes % d == 0]
        raise ValueError(
            f"algorithm.micro_batch_size={a.micro_batch_size} does not divide the {episodes} episodes of a rank's "
            f"mini-batch (mini_batch_prompts/world × rollout.n); use one of {divisors}"
        )
    return episodes // a.micro_batch_size


def torch_cuda_available() -> bool:
    """Pinned host memory needs a CUDA device; on a CPU-only machine DeepSpeed must not ask for it."""
    import torch

    return bool(torch.cuda.is_available())


def build_ds_config(cfg, world: int) -> dict[str, Any]:  # noqa: ANN001
    """The dict passed to ``deepspeed.initialize``. Batch sizes always come from the MGPO config."""
    d = cfg.deepspeed
    base: dict[str, Any] = {}
    if d.config_file:
        path = Path(d.config_file)
        if not path.exists():
            raise FileNotFoundError(
                f"deepspeed.config_file={d.config_file} does not exist (see infra/deepspeed/)"
            )
        base = json.loads(path.read_text())
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = d.zero_stage
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch_cuda_available()}
        # We hand DeepSpeed a torch optimizer (no JIT build); ZeRO-Offload otherwise insists on its CPU Adam.
        base["zero_force_ds_cpu_optimizer"] = False
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch_cuda_available()}
    if d.zero_stage == 3:
        # Rollouts and exports need whole weights: gather 16-bit weights on save.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    base.update(
        train_micro_batch_size_per_gpu=cfg.algorithm.micro_batch_size,
        gradient_accumulation_steps=micro_steps_per_minibatch(cfg, world),
        gradient_clipping=cfg.optimizer.grad_clip,
        zero_optimization=zero,
        bf16={"enabled": bool(d.bf16)},
        zero_allow_untested_optimizer=True,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    base.pop("train_batch_size", None)
    return base


def build_reference_ds_config(cfg, world: int) -> dict[str, Any]:  # noqa: ANN001
    """The config of the frozen reference model's inference-only engine under ZeRO-3: its weights sharded over the
    ranks as the policy's are (no optimiser, no gradients), gathered layer by layer in the forward pass.

    Without it every rank held a full copy of the reference (a 7B model: ~15 GiB in bf16) beside its ZeRO-3
    shard of the policy and vLLM's share of the GPU, undoing the reason for ZeRO-3. Parameter offload follows the
    policy's setting.
    """
    d = cfg.deepspeed
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch_cuda_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.algorithm.micro_batch_size,
        "gradient_accumulation_steps": micro_steps_per_minibatch(cfg, world),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(d.bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
