"""The 7B rehearsal's inputs: the preset differs from the recipe only in scale, the model directory is laid out as
the published Qwen2.5-VL-7B-Instruct, and the data files are in the benchmarks' published formats."""

from __future__ import annotations

import json

import pytest
import torch

from mgpo_core.config import load_config
from mgpo_core.config.rehearsal import REHEARSAL_SCALE_KEYS, rehearsal_differences

SHIPPED_BASE = "tiny-geo-seed0"


@pytest.fixture(scope="module")
def recipe_and_rehearsal(monkeypatch_module):
    monkeypatch_module.setenv("MGPO_MODEL_DIR", "/models/Qwen2.5-VL-7B-Instruct")
    return load_config("qwen2.5-vl-7b-8gpu"), load_config("rehearsal-7b")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_rehearsal_differs_from_the_7b_recipe_only_in_the_listed_scale_keys(recipe_and_rehearsal):
    recipe, rehearsal = recipe_and_rehearsal
    diff = rehearsal_differences(recipe, rehearsal)
    unlisted = {k: v for k, v in diff.items() if k not in REHEARSAL_SCALE_KEYS}
    assert not unlisted, f"rehearsal-7b drifted from the 7B recipe outside its scale keys: {unlisted}"
    # What the rehearsal exists to exercise is still on.
    assert rehearsal.deepspeed.zero_stage == 3 and rehearsal.deepspeed.launcher == "deepspeed"
    assert rehearsal.deepspeed.num_gpus == 2 and rehearsal.algorithm.kl_coef > 0
    assert rehearsal.algorithm.prompts_per_step // rehearsal.algorithm.mini_batch_prompts >= 2
    assert rehearsal.checkpoint.select_every and rehearsal.checkpoint.export_hf
    assert set(rehearsal.evaluation.benchmarks) == {"vstar", "hrbench_4k", "hrbench_8k", "mme_realworld_lite"}


def test_a_change_outside_the_scale_keys_is_reported(recipe_and_rehearsal):
    recipe, _ = recipe_and_rehearsal
    drifted = load_config("rehearsal-7b", ["algorithm.kl_coef=0.05", "rollout.temperature=0.7"])
    diff = rehearsal_differences(recipe, drifted)
    assert {"algorithm.kl_coef", "rollout.temperature"} <= set(diff) - set(REHEARSAL_SCALE_KEYS)
    assert diff["algorithm.kl_coef"] == (0.01, 0.05)


@pytest.fixture(scope="module")
def like_dir(tmp_path_factory):
    from mgpo_core.modeling.base import base_model_for
    from mgpo_core.modeling.like import build_like

    source = base_model_for(tmp_path_factory.mktemp("cache"), seed=0)
    assert source.name == SHIPPED_BASE
    return build_like(tmp_path_factory.mktemp("like") / "m", source), source


def test_like_model_is_laid_out_as_the_published_7b_instruct_checkpoint(like_dir):
    out, _ = like_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists(), "sharded like the real checkpoint, not one file"
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 152_064
    assert config["image_token_id"] == 151_655 and config["vision_start_token_id"] == 151_652
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["repetition_penalty"], gen["temperature"], gen["top_p"], gen["top_k"]) == (1.05, 0.1, 0.001, 1)
    assert gen["eos_token_id"] == [151_645, 151_643]
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12_845_056)
    assert "chat_template" in json.loads((out / "chat_template.json").read_text())


def test_like_model_loads_with_qwens_ids_and_computes_what_its_source_computes(like_dir):
    from mgpo_core.modeling.loading import load_bundle

    out, source = like_dir
    like, src = load_bundle(out), load_bundle(source)
    s = like.special
    assert (s.endoftext, s.im_start, s.im_end, s.image_pad) == (151_643, 151_644, 151_645, 151_655)
    assert (s.text_vocab_size, s.model_vocab_size) == (151_665, 152_064)
    assert len(s.non_text_ids()) < 1024, "as in the real checkpoint: few non-text ids (vLLM's logit-bias cap)"
    text = "What is the color of the tag? First output the coordinates of the key area in JSON."
    ids = src.tokenizer(text, return_tensors="pt").input_ids
    assert like.tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        a = src.model(input_ids=ids).logits[0].float()
        b = like.model(input_ids=ids).logits[0].float()
    n = a.shape[-1] - 28  # the source's BPE ids (below its 7 control tokens and 21 padding rows)
    torch.testing.assert_close(b[:, :n], a[:, :n], rtol=0, atol=1e-5)
    # The 150k filler ids hold a negligible share of the probability (a real checkpoint's unused ids do too).
    filler = b.softmax(-1)[:, n:151_643].sum(-1)
    assert float(filler.max()) < 1e-3
    # The chat template adds Qwen's default system turn.
    rendered = like.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                  add_generation_prompt=True)  # fmt: skip
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_published_sets_read_back_in_every_format_with_the_lite_overlap(tmp_path):
    from mgpo_core.data.published import write_published_sets
    from mgpo_core.data.readers import read_hrbench, read_mme_realworld, read_vstar

    p = write_published_sets(tmp_path / "d", train=12, per_benchmark=4, overlap=3)
    train, lite = read_mme_realworld(p["train"]), read_mme_realworld(p["mme_realworld_lite"])
    assert len(train) == 12 and len(lite) == 4 + 3
    overlap = {s.id for s in train} & {s.id for s in lite}
    assert len(overlap) == 3
    vstar = read_vstar(p["vstar"])
    assert len(vstar) == 8 and {len(s.choices) for s in vstar} == {2, 4}
    for name in ("hrbench_4k", "hrbench_8k"):
        rows = read_hrbench(p[name], image_dir=tmp_path / "cache")
        assert len(rows) == 16 and len({s.meta["cycle_category"] for s in rows}) == 4
    raw = json.loads(p["train"].read_text())[0]
    assert raw["Answer choices"][0].startswith("(A) ") and raw["Ground truth"] in "ABCD"


def test_export_from_a_sharded_base_carries_no_stale_weight_index(like_dir, tmp_path):
    from mgpo_core.modeling.loading import load_model
    from mgpo_core.training.checkpoint import check_weight_index, export_hf

    base, _ = like_dir
    model = load_model(base, dtype="bfloat16")
    out = export_hf(model, base, tmp_path / "export")
    for index in out.glob("*.index.json"):
        names = set(json.loads(index.read_text())["weight_map"].values())
        assert all((out / n).is_file() for n in names), f"{index.name} names shards the export does not have"
    check_weight_index(out)
    assert load_model(out, dtype="float32").get_input_embeddings().weight.shape[0] == 152_064
    # A directory with a stale index is refused with the fix.
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00009-of-00009.safetensors"}}))
    with pytest.raises(RuntimeError, match="names weight files that are not in"):
        check_weight_index(out)
