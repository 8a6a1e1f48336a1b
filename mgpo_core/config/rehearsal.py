"""The keys in which the rehearsal preset (``rehearsal-7b``) may differ from the 7B recipe, each with its reason.

The rehearsal exists to run every setting of ``qwen2.5-vl-7b-8gpu`` in CI; it may change only the scale (model
size, ranks, steps, batch and token caps) and what a CPU lacks (bf16 kernels, flash-attn, CUDA graphs), plus
where its inputs are. ``rehearsal_differences`` lists the keys that differ; the test fails on any key not here.
"""

from __future__ import annotations

from typing import Any

REHEARSAL_SCALE_KEYS: dict[str, str] = {
    "preset": "the name it was loaded from",
    "run_name": "names the run folder and the MLflow run",
    "model.path": "a small checkpoint laid out as Qwen2.5-VL-7B-Instruct (mgpo rehearsal prepare)",
    "model.dtype": "CPU: float32 (no fast bf16 matmuls)",
    "model.attn_implementation": "CPU: no flash-attn, SDPA",
    "deepspeed.bf16": "follows model.dtype",
    "deepspeed.num_gpus": "2 CPU ranks instead of 8 GPUs",
    "rollout.n": "rollouts per prompt",
    "rollout.max_new_tokens_turn1": "token cap",
    "rollout.max_new_tokens_turn2": "token cap",
    "rollout.max_response_tokens": "token cap",
    "rollout.max_model_len": "token cap (two small images + the response)",
    "rollout.min_pixels": "pixel cap",
    "rollout.max_pixels": "pixel cap",
    "rollout.enforce_eager": "CPU: vLLM's graph compilation costs 25 s per start and buys nothing here",
    "algorithm.prompts_per_step": "batch",
    "algorithm.mini_batch_prompts": "batch (still >= 2 optimiser steps per RL step)",
    "algorithm.micro_batch_size": "batch (one prompt's rollouts, as in the recipe)",
    "algorithm.total_steps": "steps",
    "checkpoint.every_steps": "steps",
    "checkpoint.select_every": "steps",
    "data.validation_rows": "rows held out for checkpoint selection (of 48 training rows, not 21,690)",
    "evaluation.limit": "questions per benchmark",
    "evaluation.max_new_tokens": "token cap",
    "evaluation.data_paths": "where the published-format files are (the recipe's user names them too)",
}


def rehearsal_differences(recipe: Any, rehearsal: Any) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (recipe value, rehearsal value)}`` for every leaf that differs between two configs;
    a mapping (like ``evaluation.data_paths``) counts as one leaf."""
    a = recipe.model_dump(mode="json")
    b = rehearsal.model_dump(mode="json")
    fa, fb = _flatten_sections(a), _flatten_sections(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def _flatten_sections(tree: dict[str, Any]) -> dict[str, Any]:
    """Two levels (section.field), so a dict-valued field stays one leaf."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, dict) and k2 == "filters":
                    out.update({f"{k}.{k2}.{k3}": v3 for k3, v3 in v2.items()})
                else:
                    out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out
