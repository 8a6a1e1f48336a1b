"""Model building and loading: the tiny offline Qwen2.5-VL and the one loader for it and real local checkpoints."""

from __future__ import annotations

from mgpo_core.modeling.loading import (
    ModelBundle,
    ModelPathError,
    SpecialTokens,
    load_bundle,
    load_image_processor,
    load_model,
    load_processor,
    load_tokenizer,
    model_vocab_size,
    resolve_model_path,
    special_tokens_from,
)
from mgpo_core.modeling.tiny import BUILDER_VERSION, build_tiny_model, tiny_model_dir

__all__ = [
    "BUILDER_VERSION",
    "ModelBundle",
    "ModelPathError",
    "SpecialTokens",
    "build_tiny_model",
    "load_bundle",
    "load_image_processor",
    "load_model",
    "load_processor",
    "load_tokenizer",
    "model_vocab_size",
    "resolve_model_path",
    "special_tokens_from",
    "tiny_model_dir",
]
