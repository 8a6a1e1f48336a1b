"""A small model directory laid out like a published checkpoint (``mgpo build-tiny --like qwen2.5-vl-7b``).

The rehearsal of the 7B recipe (preset ``rehearsal-7b``) must meet the files a real Qwen2.5-VL-7B-Instruct
download holds, not the tidy single-file tiny model: weights in several safetensors shards with
``model.safetensors.index.json``, the real vocabulary (151,665 tokenizer ids, 152,064 embedding rows, Qwen's
control tokens at their published ids), the Instruct ``generation_config.json`` (repetition_penalty 1.05,
temperature 0.1, top_p 0.001, top_k 1: sampling defaults our engines must NOT inherit), Qwen's processor pixel
limits and a chat template with Qwen's default system turn. Only the widths and depth are small, so it runs on
two CPU cores.

The weights come from a small source checkpoint (by default the shipped tiny base, which can box and read): its
ids are moved to the published layout (BPE ids stay, the control tokens move to 151,643..., the ids in between
become never-merged filler tokens, as the real vocabulary has ids a given text never uses) and the embedding
matrix grows to 152,064 rows; the filler rows of the LM head point against the source's mean hidden state, so the
fillers keep tiny probabilities (``_filler_head_rows``). Same source -> byte-identical shards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LIKE_PROFILES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": {
        # Published facts of Qwen/Qwen2.5-VL-7B-Instruct (its config.json, tokenizer and generation config).
        "model_vocab_size": 152064,
        "tokenizer_size": 151665,
        "first_control_id": 151643,
        "shards": 5,
        "generation": {
            "do_sample": True,
            "repetition_penalty": 1.05,
            "temperature": 0.1,
            "top_p": 0.001,
            "top_k": 1,
        },
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "dtype": "bfloat16",
    }
}
"""What ``--like`` can imitate; each entry lists only facts of the published checkpoint."""

# Qwen2.5's control tokens in their published order from id 151,643 on (the tokenizer's added tokens).
QWEN_CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

# Our own Jinja, behaving as Qwen2.5-VL-Instruct's published template does: a default system turn when the
# conversation has none, an image as <|vision_start|><|image_pad|><|vision_end|>, and the generation prompt.
QWEN_STYLE_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _id_map(src_vocab: Mapping[str, int], profile: Mapping[str, Any]) -> tuple[dict[str, int], dict[int, int]]:
    """(new vocab, old id -> new id): BPE ids unchanged, control tokens moved to their published ids, fillers."""
    controls = set(QWEN_CONTROL_TOKENS)
    bpe = {tok: i for tok, i in src_vocab.items() if tok not in controls}
    first = int(profile["first_control_id"])
    if max(bpe.values()) >= first:
        raise ValueError(f"the source tokenizer has {len(bpe)} BPE ids: more than fit below id {first}")
    vocab = dict(bpe)
    used = set(bpe.values())
    for i in range(first):
        if i not in used:
            vocab[f"<unused_{i}>"] = i  # never produced by a merge: a filler id, decodes to its own name
    old_to_new = {i: i for i in bpe.values()}
    for k, tok in enumerate(QWEN_CONTROL_TOKENS):
        vocab[tok] = first + k
        if tok in src_vocab:
            old_to_new[src_vocab[tok]] = first + k
    if len(vocab) != int(profile["tokenizer_size"]):
        raise AssertionError(f"built {len(vocab)} tokenizer ids, the profile says {profile['tokenizer_size']}")
    return vocab, old_to_new


def _write_tokenizer(src: Path, out: Path, vocab: dict[str, int]) -> None:
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["model"]["vocab"] = vocab
    first = vocab[QWEN_CONTROL_TOKENS[0]]
    tok["added_tokens"] = [
        {"id": first + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for k, t in enumerate(QWEN_CONTROL_TOKENS)
    ]  # fmt: skip
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    conf = json.loads((src / "tokenizer_config.json").read_text())
    conf["extra_special_tokens"] = [t for t in QWEN_CONTROL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]
    conf["model_max_length"] = 131072
    conf["chat_template"] = QWEN_STYLE_CHAT_TEMPLATE  # the published repository has it here and in the next file
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    # The published checkpoint carries its template as chat_template.json.
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_STYLE_CHAT_TEMPLATE}, indent=2) + "\n")


def _filler_head_rows(head: Any, n: int, hidden_mean: Any) -> Any:
    """LM-head rows for the filler ids: ``-4 * u`` with ``u`` the unit mean direction of the source's final
    hidden states (``hidden_mean``).

    A real checkpoint's unused ids have learnt tiny probabilities. Zero rows would give each filler logit 0, and
    150k of them would hold 2-77 % of the probability mass of a small model whose logits span a few units
    (measured on the shipped base). Final hidden states share a large common direction (projection ~10 on
    average, norm ~18), so rows pointing against it give the fillers logits around -40.
    """
    unit = hidden_mean.float() / hidden_mean.float().norm().clamp_min(1e-6)
    return (-4.0 * unit).to(head.dtype).expand(n, -1).clone()


def _hidden_mean(model_dir: Path) -> Any:
    """Mean final hidden state of the source model over the tiny tokenizer's own training text."""
    import torch

    from mgpo_core.modeling.loading import load_bundle
    from mgpo_core.modeling.tiny import training_corpus

    b = load_bundle(str(model_dir), dtype="float32", device="cpu", attn_implementation="sdpa")
    states = []
    with torch.no_grad():
        for text in training_corpus()[:40]:
            ids = b.tokenizer(text, return_tensors="pt").input_ids[:, :200]
            states.append(b.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0])
    return torch.cat(states).mean(0)


def build_like(out_dir: str | Path, source_dir: str | Path, *, like: str = "qwen2.5-vl-7b") -> Path:
    """Write a checkpoint shaped like ``like`` into ``out_dir`` (replaced) from the small checkpoint ``source_dir``."""
    import torch
    from safetensors.torch import load_file

    if like not in LIKE_PROFILES:
        raise ValueError(f"--like {like!r} is not known; choose one of {sorted(LIKE_PROFILES)}")
    profile = LIKE_PROFILES[like]
    src, out = Path(source_dir), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src_vocab = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    vocab, old_to_new = _id_map(src_vocab, profile)
    rows = int(profile["model_vocab_size"])
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update(load_file(f))
    dtype = getattr(torch, profile["dtype"])
    new: dict[str, Any] = {}
    old_ids = torch.tensor(sorted(old_to_new), dtype=torch.long)
    new_ids = torch.tensor([old_to_new[i] for i in sorted(old_to_new)], dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for name, t in weights.items():
        t = t.to(dtype)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            if name.endswith("lm_head.weight"):
                grown = _filler_head_rows(t, rows, _hidden_mean(src))
            else:
                std = t.float().std()
                grown = (torch.randn(rows, t.shape[1], generator=gen) * std).to(dtype)
            grown[new_ids] = t[old_ids]
            t = grown
        new[name] = t.contiguous()
    config = json.loads((src / "config.json").read_text())
    text = config.setdefault("text_config", {})
    text["vocab_size"] = rows
    ctl = {t: vocab[t] for t in QWEN_CONTROL_TOKENS}
    text.update(bos_token_id=ctl["<|endoftext|>"], eos_token_id=ctl["<|im_end|>"], pad_token_id=ctl["<|endoftext|>"])
    config.update(
        image_token_id=ctl["<|image_pad|>"], video_token_id=ctl["<|video_pad|>"],
        vision_start_token_id=ctl["<|vision_start|>"], vision_end_token_id=ctl["<|vision_end|>"],
        dtype=profile["dtype"],
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_shards(new, out, int(profile["shards"]))
    _write_tokenizer(src, out, vocab)
    gen_cfg = {
        "bos_token_id": ctl["<|endoftext|>"],
        "pad_token_id": ctl["<|endoftext|>"],
        "eos_token_id": [ctl["<|im_end|>"], ctl["<|endoftext|>"]],
        **profile["generation"],
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre.update(min_pixels=profile["min_pixels"], max_pixels=profile["max_pixels"],
               image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")  # fmt: skip
    pre.pop("size", None)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    for name in ("video_preprocessor_config.json",):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    (out / "mgpo_like.json").write_text(json.dumps({"like": like, "source": src.name}, indent=2) + "\n")
    return out


def _write_shards(tensors: Mapping[str, Any], out: Path, shards: int) -> None:
    """Safetensors shards named as transformers names them, balanced by bytes, plus the index."""
    from safetensors.torch import save_file

    names = sorted(tensors, key=lambda n: -tensors[n].numel())
    buckets: list[list[str]] = [[] for _ in range(shards)]
    sizes = [0] * shards
    for n in names:  # largest first into the lightest shard
        k = sizes.index(min(sizes))
        buckets[k].append(n)
        sizes[k] += tensors[n].numel() * tensors[n].element_size()
    weight_map = {}
    for k, bucket in enumerate(buckets):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in sorted(bucket)}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in bucket})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def is_like_complete(path: Path) -> bool:
    index = path / "model.safetensors.index.json"
    if not (index.is_file() and (path / "mgpo_like.json").is_file()):
        return False
    files = set(json.loads(index.read_text())["weight_map"].values())
    return all((path / f).is_file() for f in files)


def like_model_dir(cache_root: str | Path, source_dir: str | Path, like: str = "qwen2.5-vl-7b") -> Path:
    """``<cache_root>/like-<like>-<source name>``, built once (atomically, shared by concurrent callers)."""
    from mgpo_core.modeling.tiny import build_atomically

    final = Path(cache_root) / f"like-{like}-{Path(source_dir).name}"
    return build_atomically(final, lambda tmp: build_like(tmp, source_dir, like=like), is_complete=is_like_complete)


QWEN25_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, rope_theta=1_000_000.0)  # fmt: skip
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31], window_size=112)  # fmt: skip
"""Published widths of Qwen2.5-VL-7B-Instruct (its config.json)."""


def build_real_widths(out_dir: str | Path, like_dir: str | Path, *, text_layers: int = 28, vision_depth: int = 32,
                      seed: int = 0) -> Path:  # fmt: skip
    """A randomly initialised bf16 checkpoint with Qwen2.5-VL-7B's widths and vocabulary, ``text_layers`` decoder
    layers and ``vision_depth`` vision blocks (fewer to fit one GPU beside vLLM), the tokenizer and processor
    files of ``like_dir`` (a ``build_like`` directory), weights in shards with an index. For the GPU check: the
    recipe's shapes, not its skills (a random model writes no boxes)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    like, out = Path(like_dir), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(like, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "mgpo_like.json"))
    base = Qwen2_5_VLConfig.from_pretrained(like)
    text = base.text_config.to_dict()
    text.update(QWEN25_VL_7B_TEXT, num_hidden_layers=text_layers, max_window_layers=text_layers)
    text.pop("layer_types", None)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}
    vision = base.vision_config.to_dict()
    full = [i for i in QWEN25_VL_7B_VISION["fullatt_block_indexes"] if i < vision_depth] or [vision_depth - 1]
    vision.update(QWEN25_VL_7B_VISION, depth=vision_depth, fullatt_block_indexes=full)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=base.image_token_id,
        video_token_id=base.video_token_id, vision_start_token_id=base.vision_start_token_id,
        vision_end_token_id=base.vision_end_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Qwen2_5_VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, max_shard_size=max(1, size // 4))  # >= 4 shards and an index, as published
    (out / "mgpo_like.json").write_text(json.dumps({"like": "qwen2.5-vl-7b", "real_widths": True,
                                                    "text_layers": text_layers, "vision_depth": vision_depth}))  # fmt: skip
    return out
