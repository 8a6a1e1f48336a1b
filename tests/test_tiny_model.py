"""The tiny offline Qwen2.5-VL: deterministic build, loading through the real-checkpoint path, tokenizer,
chat template, image processor, forward pass, special ids and model-path errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mgpo_core.modeling import (
    ModelPathError,
    build_tiny_model,
    load_bundle,
    load_model,
    resolve_model_path,
    special_tokens_from,
    tiny_model_dir,
)
from mgpo_core.modeling.tiny import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def tiny_path(cache_root) -> Path:
    return tiny_model_dir(cache_root, seed=0)


@pytest.fixture(scope="module")
def bundle(tiny_path):
    return load_bundle(tiny_path)


def _image(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 9) % 256, (y * 5) % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return img


def test_same_seed_gives_byte_identical_weights_and_other_seed_differs(tiny_path, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny_path / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (again / "tokenizer.json").read_bytes() == (tiny_path / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights
    assert json.loads((other / "mgpo_tiny.json").read_text())["seed"] == 1


def test_tiny_model_dir_reuses_the_finished_build_and_leaves_no_temp_dirs(cache_root, tiny_path):
    stamp = (tiny_path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_dir(cache_root, seed=0) == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == stamp
    leftovers = [p.name for p in cache_root.iterdir() if p.is_dir() and p != tiny_path]
    assert leftovers == []


def test_build_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_tiny_model(target)
    assert (target / "keep.txt").exists()


def test_load_bundle_reads_the_tiny_checkpoint_through_the_real_checkpoint_path(bundle, tiny_path):
    assert type(bundle.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not bundle.model.training
    assert bundle.path == tiny_path.resolve()
    cfg = bundle.model.config
    assert cfg.image_token_id == bundle.special.image_pad
    assert cfg.vision_start_token_id == bundle.special.vision_start
    assert cfg.text_config.num_attention_heads * 32 == cfg.text_config.hidden_size  # head dim 32 for vLLM-CPU
    assert cfg.text_config.vocab_size % 64 == 0
    assert bundle.model.generation_config.eos_token_id == bundle.special.im_end
    assert bundle.model.generation_config.pad_token_id == bundle.special.endoftext
    assert type(bundle.image_processor).__name__.endswith("Pil")


def test_tokenizer_round_trips_text_and_keeps_each_special_token_a_single_id(bundle):
    tok = bundle.tokenizer
    text = 'Answer:\n```json\n[{"bbox_2d": [12, 340, 56, 78], "label": "red car"}]\n```\n\\boxed{C} (A) é'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # merges were learnt, not just bytes
    for name in SPECIAL_TOKENS:
        wrapped = tok(f"a{name}b", add_special_tokens=False)["input_ids"]
        assert wrapped.count(tok.convert_tokens_to_ids(name)) == 1 and len(wrapped) == 3, name
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template_renders_system_user_image_and_assistant_turns(bundle):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the car?"}]},
        {"role": "assistant", "content": "\\boxed{A}"},
    ]
    rendered = bundle.tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the car?<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{A}<|im_end|>\n"
    )
    prompt = bundle.tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What color is the car?<|im_end|>\n<|im_start|>assistant\n")


def test_image_processor_gives_one_row_per_patch_and_the_grid_for_a_56x84_image(bundle):
    width, height = 56, 84  # both already multiples of 28, so the processor must not resize
    out = bundle.image_processor(images=[_image(width, height)], return_tensors="pt")
    grid = out["image_grid_thw"]
    assert grid.tolist() == [[1, height // 14, width // 14]]
    assert tuple(out["pixel_values"].shape) == (int(grid.prod()), 3 * 2 * 14 * 14)


def test_forward_with_one_image_gives_finite_logits_over_the_padded_vocab(bundle):
    sp, tok = bundle.special, bundle.tokenizer
    vis = bundle.image_processor(images=[_image(56, 84)], return_tensors="pt")
    n_image_tokens = int(vis["image_grid_thw"].prod()) // 4  # spatial merge 2x2
    ids = (
        [sp.im_start, *tok("user\n", add_special_tokens=False)["input_ids"], sp.vision_start]
        + [sp.image_pad] * n_image_tokens
        + [sp.vision_end, *tok("Which letter?", add_special_tokens=False)["input_ids"], sp.im_end]
    )
    with torch.no_grad():
        logits = bundle.model(
            input_ids=torch.tensor([ids]),
            pixel_values=vis["pixel_values"],
            image_grid_thw=vis["image_grid_thw"],
        ).logits
    assert tuple(logits.shape) == (1, len(ids), bundle.special.model_vocab_size)
    assert torch.isfinite(logits).all()


def test_non_text_ids_hold_vision_ids_and_padded_rows_but_not_turn_ends(bundle):
    sp = bundle.special
    banned = sp.non_text_ids()
    assert sp.text_vocab_size == len(bundle.tokenizer) < sp.model_vocab_size
    assert {sp.image_pad, sp.video_pad, sp.vision_start, sp.vision_end} <= set(banned)
    assert set(range(sp.text_vocab_size, sp.model_vocab_size)) <= set(banned)
    assert sp.im_end not in banned and sp.endoftext not in banned
    assert banned == sorted(banned)


def test_special_tokens_from_names_the_missing_tokens_of_a_non_qwen_tokenizer():
    class PlainTokenizer:
        name_or_path = "plain"
        pad_token_id = 0

        def get_vocab(self):
            return {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3}

        def __len__(self):
            return 4

    with pytest.raises(ModelPathError, match=r"<\|vision_start\|>.*not a Qwen2-VL-family checkpoint"):
        special_tokens_from(PlainTokenizer(), 64)


def test_special_tokens_from_rejects_a_model_smaller_than_its_tokenizer(bundle):
    with pytest.raises(ModelPathError, match="different checkpoints"):
        special_tokens_from(bundle.tokenizer, len(bundle.tokenizer) - 1)


def test_resolve_model_path_none_gives_the_cached_tiny_model(cache_root, tiny_path):
    assert resolve_model_path(None, cache_root=cache_root) == tiny_path


def test_resolve_model_path_rejects_a_missing_directory_with_the_fix(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist.*local Hugging Face checkpoint directory"):
        resolve_model_path(str(tmp_path / "nope"), cache_root=tmp_path)


def test_resolve_model_path_rejects_a_hub_id_and_says_nothing_downloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "Qwen/..." cannot accidentally exist relative to the cwd
    with pytest.raises(ModelPathError, match="hub id.*not accepted.*--local-dir"):
        resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct", cache_root=tmp_path)


def test_resolve_model_path_rejects_a_directory_without_config_json(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelPathError, match="no config.json"):
        resolve_model_path(tmp_path / "weights", cache_root=tmp_path)


def test_load_model_rejects_an_unknown_dtype_with_the_allowed_values(tiny_path):
    with pytest.raises(ValueError, match="float32"):
        load_model(tiny_path, dtype="fp8")


def test_full_auto_processor_matches_the_pil_image_processor(bundle, tiny_path):
    pytest.importorskip("torchvision.transforms.v2.functional", reason="run infra/patch_torchvision.py")
    from mgpo_core.modeling import load_processor

    proc = load_processor(tiny_path)
    img = _image(56, 84)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Why?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    full = proc(text=[text], images=[img], return_tensors="pt")
    alone = bundle.image_processor(images=[img], return_tensors="pt")
    assert torch.allclose(full["pixel_values"], alone["pixel_values"], atol=1e-5)
    expanded = int(alone["image_grid_thw"].prod()) // 4
    assert full["input_ids"][0].tolist().count(bundle.special.image_pad) == expanded
