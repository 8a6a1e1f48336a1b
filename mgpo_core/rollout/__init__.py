"""Rollout engines by name: ``hf`` (Hugging Face generate), ``vllm`` (production), ``auto`` (vLLM when importable)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from mgpo_core.rollout.base import (
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    RolloutSettings,
    SamplingSpec,
)

ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_engine(name: str) -> Callable[[Callable[..., RolloutEngine]], Callable[..., RolloutEngine]]:
    """Register an engine factory under ``name``; a second registration of the same name is an error."""

    def deco(factory: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        if name in ENGINES:
            raise ValueError(f"rollout engine {name!r} is already registered")
        ENGINES[name] = factory
        return factory

    return deco


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(name: str) -> str:
    """``auto`` → ``vllm`` when vLLM is importable and an engine for it is registered, else ``hf``."""
    if name == "auto":
        return "vllm" if vllm_available() and "vllm" in ENGINES else "hf"
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {sorted(ENGINES)} or 'auto'")
    return name


@register_engine("hf")
def _make_hf(**kwargs) -> RolloutEngine:  # noqa: ANN003
    from mgpo_core.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(**kwargs)


@register_engine("vllm")
def _make_vllm(**kwargs) -> RolloutEngine:  # noqa: ANN003
    from mgpo_core.rollout.vllm_engine import make_vllm_engine

    return make_vllm_engine(**kwargs)


__all__ = [
    "ENGINES",
    "GenerationRequest",
    "GenerationResult",
    "RolloutEngine",
    "RolloutSettings",
    "SamplingSpec",
    "register_engine",
    "resolve_engine_name",
    "vllm_available",
]
