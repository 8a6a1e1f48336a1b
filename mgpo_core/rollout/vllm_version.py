"""The vLLM release the engine is written for, and the check that refuses another (engine start, preflight)."""

from __future__ import annotations

SUPPORTED_VLLM = "0.32"
"""The vLLM minor this engine is written for: ``logprobs_mode="processed_logprobs"``, ``reload_weights`` into a
woken engine, and what ``wake_up`` returns are 0.32's. The ``gpu`` extra pins it; preflight checks it too."""


def require_supported_vllm(version: str) -> None:
    """Raise with the fix when ``version`` is not a 0.32 release (another minor changes the APIs above)."""
    if not (version == SUPPORTED_VLLM or version.startswith(SUPPORTED_VLLM + ".")):
        raise RuntimeError(
            f"vLLM {version} is installed; this rollout engine is written for vLLM {SUPPORTED_VLLM}.x (log-prob "
            f"mode, weight reload, sleep/wake). Install it: pip install 'vllm=={SUPPORTED_VLLM}.*' (the project's "
            "[gpu] extra pins it), or set rollout.engine=hf"
        )
