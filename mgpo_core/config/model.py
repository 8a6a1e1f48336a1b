"""`ModelConfig`: the policy model (and frozen reference model) to load and how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mgpo_core.config.base import _Section


class ModelConfig(_Section):
    """The policy model (also the frozen reference model for the KL term)."""

    path: str | None = None
    """Local Hugging Face model directory; None builds (or reuses) the offline tiny Qwen2.5-VL."""
    tiny_seed: int = Field(0, ge=0)
    """Seed of the offline tiny model (its random init, or the base model's pre-training); ignored when `path`
    is set."""
    tiny: Literal["random", "base"] = "random"
    """Which offline tiny model `path: null` means: `random` (random init; fast tests of the machinery) or
    `base` (pre-trained on synthetic grounding and reading tasks, so MGPO can show learning; shipped with the
    project for seed 0, built and cached under `<state_dir>/models` otherwise)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype the model is loaded in (and the rollout engine runs in)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (METHOD.md §2 uses it)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory (off: Qwen2.5-VL is built into transformers)."""
