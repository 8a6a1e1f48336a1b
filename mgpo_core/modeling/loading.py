"""Load a Qwen2-VL-family checkpoint from a LOCAL directory - the tiny offline model or a real one, same code path.

Nothing here downloads: every ``from_pretrained`` call passes ``local_files_only=True`` and hub ids are refused
with a message saying how to provide a local directory instead.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgpo_core.modeling.tiny import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    tiny_model_dir,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

_DTYPES = ("float32", "bfloat16", "float16", "auto")
# "owner/name" with hub-legal characters; only checked for paths that do not exist locally.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelPathError(ValueError):
    """A model path that is not a usable local Hugging Face checkpoint directory."""


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the episode builder, the samplers and the loss mask need, read from the tokenizer.

    ``text_vocab_size`` is ``len(tokenizer)``: ids at or above it are padding rows of the embedding matrix
    (``model_vocab_size`` rows in all; None means no padding rows) that never correspond to text.
    """

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    endoftext: int
    pad: int
    text_vocab_size: int
    model_vocab_size: int | None = None

    def non_text_ids(self) -> list[int]:
        """Ids a sampler must never emit as text (METHOD.md §5): vision markers/placeholders and padded rows.

        Sorted ascending; ``<|im_end|>`` and ``<|endoftext|>`` are NOT included (they end a turn legitimately).
        """
        ids = {self.image_pad, self.video_pad, self.vision_start, self.vision_end}
        if self.model_vocab_size is not None:
            ids.update(range(self.text_vocab_size, self.model_vocab_size))
        return sorted(ids)


_REQUIRED = {
    "im_start": IM_START,
    "im_end": IM_END,
    "vision_start": VISION_START,
    "vision_end": VISION_END,
    "image_pad": IMAGE_PAD,
    "video_pad": VIDEO_PAD,
    "endoftext": ENDOFTEXT,
}


def special_tokens_from(tokenizer: Any, model_vocab_size: int) -> SpecialTokens:
    """Read Qwen's control-token ids from ``tokenizer``; ``model_vocab_size`` = rows of the embedding matrix.

    Raises ModelPathError naming every missing token when the tokenizer is not from a Qwen2-VL-family checkpoint,
    and when the model has fewer embedding rows than the tokenizer has ids.
    """
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in _REQUIRED.values() if tok not in vocab]
    if missing:
        raise ModelPathError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} lacks the special token(s) {missing}; the "
            "directory is not a Qwen2-VL-family checkpoint (Qwen2-VL / Qwen2.5-VL), which this pipeline requires"
        )
    text_vocab_size = len(tokenizer)
    if model_vocab_size < text_vocab_size:
        raise ModelPathError(
            f"the model has {model_vocab_size} embedding rows but the tokenizer has {text_vocab_size} ids; the "
            "tokenizer and the weights come from different checkpoints"
        )
    ids = {field: int(vocab[tok]) for field, tok in _REQUIRED.items()}
    pad = tokenizer.pad_token_id
    return SpecialTokens(
        **ids,
        pad=ids["endoftext"] if pad is None else int(pad),
        text_vocab_size=text_vocab_size,
        model_vocab_size=int(model_vocab_size),
    )


def _check_local_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Return the absolute directory, or raise ModelPathError saying what is missing and how to fix it."""
    raw = os.fspath(path)
    local = Path(raw).expanduser()
    if not local.exists():
        if _HUB_ID.match(raw) and not raw.startswith((".", "~")):
            raise ModelPathError(
                f"model path {raw!r} does not exist locally and looks like a Hugging Face hub id; hub ids are not "
                "accepted because nothing is downloaded at run time. Download the checkpoint beforehand (e.g. "
                f"`huggingface-cli download {raw} --local-dir /models/{raw.split('/')[-1]}`) and pass that "
                "directory, or leave model.path unset to use the offline tiny model"
            )
        raise ModelPathError(
            f"model path {raw!r} does not exist (resolved to {local.absolute()}); pass an existing local "
            "Hugging Face checkpoint directory, or leave model.path unset to use the offline tiny model"
        )
    if not local.is_dir():
        raise ModelPathError(
            f"model path {raw!r} is a file; pass the checkpoint DIRECTORY that holds config.json"
        )
    if not (local / "config.json").is_file():
        raise ModelPathError(
            f"model directory {str(local)!r} has no config.json; it must be a Hugging Face-format checkpoint "
            "(config.json, *.safetensors, tokenizer files, preprocessor_config.json) - hub ids are not accepted"
        )
    return local.resolve()


def resolve_model_path(
    path: str | os.PathLike[str] | None, *, cache_root: str | Path, tiny_seed: int = 0
) -> Path:
    """Map a configured model path to a local checkpoint directory.

    ``None`` -> the offline tiny model under ``cache_root`` (built on first use); anything else must be an
    existing local directory with a ``config.json``.
    """
    if path is None:
        return tiny_model_dir(cache_root, seed=tiny_seed)
    return _check_local_checkpoint(path)


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer (``Qwen2Tokenizer`` for Qwen2.5-VL), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_check_local_checkpoint(path), local_files_only=True)


def load_image_processor(path: str | Path) -> Any:
    """The image processor alone, PIL backend: works without torchvision (which is broken beside CPU torch).

    Returns e.g. ``Qwen2VLImageProcessorPil``; ``processor(images=[...])`` yields ``pixel_values`` of shape
    (sum_i t_i*h_i*w_i, 3*temporal_patch*patch^2) and ``image_grid_thw`` of shape (n_images, 3).
    """
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(
        _check_local_checkpoint(path), local_files_only=True, backend="pil"
    )


def load_processor(path: str | Path) -> Any:
    """The full multimodal ``AutoProcessor`` (tokenizer + image + video processor); needs an importable
    torchvision for the video part (see infra/patch_torchvision.py)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(_check_local_checkpoint(path), local_files_only=True)


def _torch_dtype(dtype: str) -> torch.dtype | str:
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"load_model: dtype={dtype!r} is not supported; use one of {list(_DTYPES)}")
    return dtype if dtype == "auto" else getattr(torch, dtype)


def flash_attn_available() -> bool:
    """Whether the flash-attn package imports (transformers' ``flash_attention_2`` needs it)."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(name: str) -> str:
    """``name``, or ``sdpa`` when ``flash_attention_2`` cannot run here (flash-attn missing, or no CUDA device).

    flash-attn is not on the package registries as a wheel for every torch/CUDA pair (it compiles for ~1 h), so
    the GPU install does not force it. PyTorch's SDPA dispatches to a FlashAttention kernel itself on Ampere and
    newer GPUs, so the fallback keeps the memory profile; it is announced once, never silent.
    """
    import torch

    if name != "flash_attention_2":
        return name
    if flash_attn_available() and torch.cuda.is_available():
        return name
    why = "flash-attn is not installed" if not flash_attn_available() else "no CUDA device is visible"
    if name not in _ATTN_FALLBACK_ANNOUNCED:
        _ATTN_FALLBACK_ANNOUNCED.add(name)
        log.warning("model.attn_implementation=flash_attention_2 but %s: loading with sdpa instead (PyTorch's "
                    "SDPA runs a FlashAttention kernel on recent GPUs); pip install flash-attn to use it", why)  # fmt: skip
    return "sdpa"


_ATTN_FALLBACK_ANNOUNCED: set[str] = set()


def load_model(
    path: str | Path, *, dtype: str = "float32", device: str = "cpu", attn_implementation: str = "sdpa"
) -> Qwen2_5_VLForConditionalGeneration:
    """The vision-language model in eval mode on ``device``.

    Loaded through ``AutoModelForImageTextToText`` so the class follows the checkpoint's config
    (``Qwen2_5_VLForConditionalGeneration`` for Qwen2.5-VL, the tiny model included).
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        _check_local_checkpoint(path),
        dtype=_torch_dtype(dtype),
        attn_implementation=resolve_attn_implementation(attn_implementation),
        local_files_only=True,
    )
    return model.to(device).eval()


def model_vocab_size(model_or_config: Any) -> int:
    """Rows of the input embedding matrix, from a model or its config (text_config for VLMs)."""
    config = getattr(model_or_config, "config", model_or_config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


@dataclass
class ModelBundle:
    """Everything a rollout engine or trainer needs about one checkpoint, loaded together and consistent."""

    path: Path
    model: Any
    tokenizer: Any
    image_processor: Any
    special: SpecialTokens


def load_bundle(path: str | Path, **model_kwargs: Any) -> ModelBundle:
    """Load model (``model_kwargs`` go to :func:`load_model`), tokenizer, PIL image processor and special ids."""
    local = _check_local_checkpoint(path)
    tokenizer = load_tokenizer(local)
    model = load_model(local, **model_kwargs)
    return ModelBundle(
        path=local,
        model=model,
        tokenizer=tokenizer,
        image_processor=load_image_processor(local),
        special=special_tokens_from(tokenizer, model_vocab_size(model)),
    )
