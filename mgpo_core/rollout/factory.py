"""One rollout engine from a config: the model directory it names, loaded for the engine chosen by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mgpo_core.config import MGPOConfig
    from mgpo_core.rollout.base import RolloutEngine


def build_rollout_engine(cfg: MGPOConfig, name: str | None = None) -> RolloutEngine:
    """A rollout engine for ``cfg.model`` by registry name (``hf``, ``vllm``, ``auto``; default
    ``rollout.engine``). The HF engine runs on CUDA when available, else CPU."""
    import torch

    from mgpo_core.episodes import PromptTemplates
    from mgpo_core.modeling.loading import load_bundle
    from mgpo_core.modeling.source import model_dir_for
    from mgpo_core.rollout import ENGINES, RolloutSettings, resolve_engine_name

    engine = resolve_engine_name(name or cfg.rollout.engine)
    path = model_dir_for(cfg)
    if engine == "hf":
        bundle = load_bundle(
            path,
            dtype=cfg.model.dtype,
            device="cuda" if torch.cuda.is_available() else "cpu",
            attn_implementation=cfg.model.attn_implementation,
        )
        return ENGINES["hf"](
            model=bundle.model,
            tokenizer=bundle.tokenizer,
            image_processor=bundle.image_processor,
            special=bundle.special,
            templates=PromptTemplates.from_config(cfg.rollout),
            settings=RolloutSettings.from_config(cfg),
            batch_size=cfg.evaluation.batch_size,
        )
    # Other engines (vLLM) load the weights themselves from the directory: only the text/image pieces here.
    from transformers import AutoConfig

    from mgpo_core.imaging import model_max_pixels, overview_area_bound
    from mgpo_core.modeling.loading import (
        load_image_processor,
        load_tokenizer,
        model_vocab_size,
        special_tokens_from,
    )

    tokenizer = load_tokenizer(path)
    image_processor = load_image_processor(path)
    rows = model_vocab_size(AutoConfig.from_pretrained(path, local_files_only=True))
    # vLLM re-applies smart_resize with these bounds; it is the identity on our 28-multiple images as long as
    # the upper bound also admits the direct mode's full-resolution image, not only the MGPO overview.
    direct = cfg.evaluation.direct_max_pixels or model_max_pixels(image_processor)
    return ENGINES[engine](
        model_dir=path,
        tokenizer=tokenizer,
        image_processor=image_processor,
        special=special_tokens_from(tokenizer, rows),
        cfg=cfg,
        mm_processor_kwargs={
            "min_pixels": 28 * 28,
            "max_pixels": overview_area_bound(max(cfg.rollout.max_pixels, direct)),
        },
    )
