"""Build a tiny, randomly initialised Qwen2.5-VL checkpoint offline and deterministically from a seed.

The result is an ordinary Hugging Face directory (config, safetensors, tokenizer, chat template, image/video
processor configs, generation config) that loads through the stock ``Auto*`` classes and vLLM exactly like a
downloaded Qwen2.5-VL checkpoint, so tests and the embedded CPU default exercise the real code paths without
touching a model hub. Same seed -> byte-identical ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BUILDER_VERSION = "1"
"""Bumped whenever the built files change; part of the cache directory name so stale builds are never reused."""

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
"""Qwen's control tokens in Qwen's relative order; they get the ids right after the BPE vocabulary."""

BPE_VOCAB_SIZE = 420
"""256 byte symbols + merges. With the 7 specials the tokenizer has 427 ids and the model 448 rows, so a range
of padded, never-trained ids exists exactly as in real Qwen checkpoints (151,665 tokens vs 152,064 rows)."""

# Qwen2's pre-tokenisation regex (public tokenizer fact): digits split one by one, so coordinates tokenise
# digit-wise and no merge can glue numbers together.
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Rendered in content order, like Qwen2-VL's own template: a user turn normally lists the image first.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 14 * 14 * 4 * 16384
"""Wide on purpose: our imaging code resizes to multiples of 28 first, so the processor must never resize again."""

_WORDS = (
    "the a an of to in on at is are was be and or not it this that with for from as by what which where who how "
    "many much color colour shape left right above below behind front near far top bottom side middle center "
    "large small big tiny red green blue yellow white black orange purple pink brown gray grey person people "
    "man woman child dog cat car bus truck bicycle sign sky tree building window door table chair cup bottle "
    "book phone text number letter word clock time street road water boat bird flag light picture photo "
    "image sub original enlarged crop region area key coordinates json format output final answer question "
    "choices listed below choose option correct select think analyse analyze both first then provide give "
    "relevant please inside your reply end stop zoom detail view see look object objects located position "
    "relative coordinate box bounding missing invalid could not be used here again instead insufficient "
    "information use you are helpful assistant system user",
)

_SAMPLE_REPLIES = (
    '```json\n[{"bbox_2d": [112, 56, 308, 224], "label": "red car"}]\n```',
    '```json\n[\n  {"bbox_2d": [0, 28, 140, 196], "label": "sign"}\n]\n```',
    "The key area is the sign on the left.\n```json\n"
    '[{"bbox_2d": [84, 140, 252, 392], "label": "text on the sign"}]\n```',
    "The enlarged sub-image shows the object clearly. The answer is \\boxed{A}.",
    "Looking at both images, the correct option is \\boxed{B}",
    "\\boxed{C}",
    "\\boxed{D}",
    "\\boxed{E}",
    "The choices are listed below:\n(A) red\n(B) blue\n(C) green\n(D) white\n(E) black\n",
    "(A) left\n(B) right\n",
)

_SAMPLE_PROMPTS = (
    "You are a helpful assistant.",
    "Given an image and a question, first output the coordinates of the key image area relevant to the "
    "question in JSON format at the end of your reply, then stop.",
    "The system will crop that area from the original image and show it to you enlarged.",
    "Once you see the enlarged image, give the final answer letter inside \\boxed{}.",
    "Question: What is the color of the car? Output the coordinates of the key area in JSON format.",
    "Here is the sub-image for your coordinates. Analyse both the original image and the enlarged sub-image; "
    "if the sub-image is insufficient, use the original image. Put the final answer letter in \\boxed{}.",
    "The box was missing or invalid, so here is the original image again.",
)


def training_corpus() -> list[str]:
    """The built-in text the BPE merges are learnt from: our prompts, replies, JSON, letters and digits.

    Repetition weights the frequent fragments (``"bbox_2d"``, fences, ``\\boxed{``) so they become single tokens.
    """
    words = _WORDS[0].split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [w.capitalize() for w in words[:40]]
    digits = [" ".join(str((i * 37 + k) % 1000) for k in range(8)) for i in range(20)]
    letters = [f"({c}) \\boxed{{{c}}} {c}" for c in "ABCDE"]
    return (lines + list(_SAMPLE_PROMPTS)) * 4 + list(_SAMPLE_REPLIES) * 8 + digits + letters * 4


def build_tokenizer() -> Any:
    """Train the byte-level BPE and wrap it as a ``Qwen2Tokenizer`` with Qwen's specials and chat template.

    Returns a transformers tokenizer of ``BPE_VOCAB_SIZE + 7`` ids; eos = ``<|im_end|>``, pad = ``<|endoftext|>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2 import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    # Same normaliser / pre-tokeniser / decoder as Qwen2Tokenizer builds, so reloading changes nothing.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_corpus(), trainer)
    model_state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model_state["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_state["merges"]]
    base = len(vocab)
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = base + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=32768,
        additional_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    missing = [t for t in SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(t) != vocab[t]]
    if missing:
        raise RuntimeError(f"tiny tokenizer lost the fixed ids of {missing}; the transformers API changed")
    return tokenizer


def processor_files() -> dict[str, dict[str, Any]]:
    """The processor JSON files of a Qwen2.5-VL checkpoint, written as plain dicts.

    Written directly (not via the processor classes) so building needs no torchvision; the keys mirror the
    files shipped with Qwen2.5-VL-7B-Instruct, with our own pixel bounds.
    """
    common = {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_resize": True,
        "do_convert_rgb": True,
        "processor_class": "Qwen2_5_VLProcessor",
    }
    return {
        "preprocessor_config.json": {**common, "image_processor_type": "Qwen2VLImageProcessor"},
        "video_preprocessor_config.json": {**common, "video_processor_type": "Qwen2VLVideoProcessor"},
        "processor_config.json": {"processor_class": "Qwen2_5_VLProcessor"},
    }


def model_config(
    tokenizer: Any, *, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None
) -> Any:
    """The tiny ``Qwen2_5_VLConfig``: ~0.65 M parameters, head dim 32 (vLLM's CPU attention needs >= 32).

    ``text`` / ``vision`` override entries of the text / vision sub-configs (the base model is wider).
    """
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    text_cfg = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": False,
    }
    vision_cfg = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        text_config={**text_cfg, **(text or {})},
        vision_config={**vision_cfg, **(vision or {})},
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def greedy_generation_config(config: Any) -> Any:
    """The ``generation_config.json`` our checkpoints ship: Qwen's bos/eos/pad ids, greedy by default."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (created) and return it as a Path.

    Raises FileExistsError when ``out_dir`` is a non-empty directory and ``overwrite`` is False.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"build_tiny_model: {out} already exists and is not empty; pass overwrite=True to replace it "
                "or choose an empty directory"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    config = model_config(tokenizer)
    # fork_rng keeps the caller's global RNG stream untouched by our seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = greedy_generation_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, content in processor_files().items():
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    # Written last: its presence marks a complete build (tiny_model_dir relies on it).
    note = {
        "builder": "mgpo_core.modeling.tiny",
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "tokenizer_size": len(tokenizer),
        "model_vocab_size": config.text_config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "mgpo_tiny.json").write_text(json.dumps(note, indent=2, sort_keys=True) + "\n")
    return out


REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer_config.json",
    "tokenizer.json",
    "preprocessor_config.json",
    "mgpo_tiny.json",
)
"""What a finished tiny build holds; ``mgpo_tiny.json`` is written last inside the temporary directory."""


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise builders across processes (POSIX flock, released by the kernel if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_tree(root: Path) -> None:
    """Flush every file of a finished build before it is renamed into place (a crash never leaves a named,
    half-flushed directory)."""
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def build_atomically(
    final: str | Path,
    build: Callable[[Path], Any],
    *,
    is_complete: Callable[[Path], bool],
) -> Path:
    """Return ``final``, building it with ``build(tmp_dir)`` first if it is not complete.

    Readers never see a partial directory: the build goes to a temporary sibling that is flushed and renamed into
    place in one step. Concurrent callers (other ranks, other test sessions) wait on a lock file beside it and
    then reuse the finished build instead of building again; a lock whose holder died is released by the kernel.
    A directory at ``final`` that is not complete (debris of a non-atomic copy) is replaced. Any model or data
    directory that several processes may build at once should go through here.
    """
    final = Path(final).expanduser()
    if is_complete(final):
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{final.name}.lock"):
        if is_complete(final):
            return final
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            build(tmp)
            if not is_complete(tmp):
                raise RuntimeError(f"building {final} produced an incomplete directory ({tmp})")
            _fsync_tree(tmp)
            try:
                os.replace(tmp, final)
            except OSError:
                if not is_complete(final):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_model_dir(cache_root: str | Path, seed: int = 0) -> Path:
    """Return ``<cache_root>/tiny-qwen2.5-vl-<BUILDER_VERSION>-seed<seed>``, building it once if absent.

    Built through :func:`build_atomically`: a reader never sees a half-written directory, and concurrent callers
    wait for the one build instead of building twice.
    """
    final = Path(cache_root).expanduser() / f"tiny-qwen2.5-vl-{BUILDER_VERSION}-seed{seed}"
    return build_atomically(
        final, lambda tmp: build_tiny_model(tmp, seed=seed, overwrite=True), is_complete=_is_complete
    )
