"""Rollout throughput of the vLLM engine against the HF engine on the same model, prompts and n, in one run.

Both engines roll out the same synthetic samples with the same sampling settings (training rollouts:
temperature 1, seeded), interleaved repeat by repeat so machine noise hits both alike; the script prints
episodes/s, generated tokens/s and their vLLM/HF ratios, and the time of one weight push (trainer → vLLM).

CPU (the tiny offline Qwen2.5-VL):
    .venv/bin/python bench/bench_rollout.py --samples 8 --n 4 --repeats 3

GPU (``--gpu-config``): a randomly initialised Qwen2.5-VL with the 7B model's dimensions (hidden 3584,
28 layers, 28/4 heads, vision depth 32) in bf16 and the paper's image sizes, so tokens/s per GPU can be set
against the ~1,600-2,000 tokens/s/GPU published for single-turn 7B VLM GRPO rollouts on H100s. vLLM starts
with dummy weights and receives the HF model's weights through ``sync_weights`` (timed) before anything is
measured, so both engines run the same weights. The vocabulary stays the offline tokenizer's 448 rows (a real
checkpoint has 152,064: its LM head is ~7-8% of the per-token FLOPs), so GPU tokens/s are slightly optimistic.
    python bench/bench_rollout.py --gpu-config --samples 64 --n 8 --max-new-tokens 512 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SEVEN_B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
)
SEVEN_B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
)  # fmt: skip
PUBLISHED_TOKENS_PER_GPU = (1600, 2000)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=8, help="prompts per rollout batch")
    p.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed batches per engine (after one warm-up batch)"
    )
    p.add_argument("--sync-repeats", type=int, default=5, help="timed weight pushes")
    p.add_argument("--max-new-tokens", type=int, nargs=2, default=(48, 32), metavar=("TURN1", "TURN2"))
    p.add_argument("--engines", default="hf,vllm", help="comma-separated subset of hf,vllm")
    p.add_argument("--gpu-config", action="store_true", help="7B-sized random Qwen2.5-VL in bf16 on CUDA")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override for both engines, e.g. rollout.enforce_eager=false (repeatable)",
    )  # fmt: skip
    p.add_argument("--workdir", default=None, help="where the model and images go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args()


def seven_b_dir(tiny: Path, out: Path) -> Path:
    """The tiny checkpoint's tokenizer and processor files with a 7B-sized config and no weights."""
    from transformers import Qwen2_5_VLConfig

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("*.safetensors", "mgpo_tiny.json"))
    cfg = Qwen2_5_VLConfig.from_pretrained(tiny)
    text = cfg.text_config.to_dict()
    text.update(SEVEN_B_TEXT)
    text.pop("layer_types", None)  # derived from num_hidden_layers again
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [16, 24, 24]}
    vision = cfg.vision_config.to_dict()
    vision.update(SEVEN_B_VISION)
    big = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=False,
    )
    big.save_pretrained(out)
    return out


def generated_tokens(episodes) -> int:  # noqa: ANN001
    """Tokens the engine sampled (finite rollout log-prob), both turns; forced <|im_end|> tokens excluded."""
    import torch

    return int(sum(int(torch.isfinite(ep.rollout_logprobs).sum()) for ep in episodes))


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mgpo_core.config import load_config
    from mgpo_core.data.synthetic import iter_synthetic_samples
    from mgpo_core.episodes import PromptTemplates
    from mgpo_core.modeling.loading import (
        load_bundle,
        load_image_processor,
        load_tokenizer,
        special_tokens_from,
    )
    from mgpo_core.modeling.tiny import tiny_model_dir
    from mgpo_core.rollout import RolloutSettings
    from mgpo_core.rollout.hf import HFRolloutEngine
    from mgpo_core.rollout.vllm_engine import VLLMOptions, VLLMRolloutEngine, full_named_parameters

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rollout-"))
    tiny = tiny_model_dir(work / "models", seed=0)
    t1, t2 = args.max_new_tokens
    overrides = [
        f"rollout.n={args.n}",
        f"rollout.max_new_tokens_turn1={t1}",
        f"rollout.max_new_tokens_turn2={t2}",
        f"rollout.max_response_tokens={t1 + t2 + 4096}",
    ]
    if args.gpu_config:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-config needs a CUDA device (torch.cuda.is_available() is False)")
        overrides += ["model.dtype=bfloat16", "rollout.min_pixels=200704", "rollout.max_pixels=1003520",
                      "rollout.enforce_eager=false"]  # fmt: skip
        size, device = (2048, 1536), "cuda"
        model_dir = seven_b_dir(tiny, work / "models" / "random-qwen2.5-vl-7b-dims")
        tokenizer = load_tokenizer(model_dir)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                Qwen2_5_VLForConditionalGeneration.config_class.from_pretrained(model_dir),
                dtype=torch.bfloat16,
            ).eval()
        image_processor = load_image_processor(model_dir)
        special = special_tokens_from(tokenizer, model.config.text_config.vocab_size)
        extra = {"load_format": "dummy", "max_model_len": 8192}
    else:
        size, device = (1024, 768), "cpu"
        model_dir = tiny
        b = load_bundle(tiny)
        model, tokenizer, image_processor, special = b.model, b.tokenizer, b.image_processor, b.special
        extra = {"max_model_len": 4096}
    cfg = load_config("tiny-cpu", overrides + list(args.set))
    samples = list(
        iter_synthetic_samples(work / "images", args.samples, seed=0, width=size[0], height=size[1])
    )
    templates, settings = PromptTemplates.from_config(cfg.rollout), RolloutSettings.from_config(cfg)

    built: dict[str, object] = {}
    startup: dict[str, float] = {}
    if "hf" in engines:
        built["hf"] = HFRolloutEngine(
            model, tokenizer, image_processor, special, templates, settings, batch_size=64
        )
    if "vllm" in engines:
        t0 = time.perf_counter()
        opts = VLLMOptions.from_config(cfg)
        built["vllm"] = VLLMRolloutEngine(
            model_dir, tokenizer, image_processor, special, templates, settings,
            options=VLLMOptions(**{**opts.__dict__, "extra": extra}),
        )  # fmt: skip
        startup["vllm"] = time.perf_counter() - t0

    sync_s: list[float] = []
    if "vllm" in built:
        for _ in range(max(1, args.sync_repeats)):  # the first push also replaces the GPU run's dummy weights
            t0 = time.perf_counter()
            built["vllm"].sync_weights(full_named_parameters(model))
            if device == "cuda":
                torch.cuda.synchronize()
            sync_s.append(time.perf_counter() - t0)

    for eng in built.values():  # warm-up: first-call costs (vLLM profiling, kernel selection) stay untimed
        eng.generate_episodes(samples[:2], n=args.n, seed=999)
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in built}
    for r in range(args.repeats):
        for name, eng in built.items():
            t0 = time.perf_counter()
            eps = eng.generate_episodes(samples, n=args.n, seed=r)
            if device == "cuda":
                torch.cuda.synchronize()
            runs[name].append((time.perf_counter() - t0, len(eps), generated_tokens(eps)))

    results: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        secs = sum(s for s, _, _ in rs)
        results[name] = {
            "episodes_per_s": sum(e for _, e, _ in rs) / secs,
            "tokens_per_s": sum(t for _, _, t in rs) / secs,
            "mean_batch_s": secs / len(rs),
            "generated_tokens_per_episode": sum(t for _, _, t in rs) / sum(e for _, e, _ in rs),
        }
    machine = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.processor() or 'cpu'}, "
        + (f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    )
    print(f"\nmachine: {machine}")
    print(f"model: {model_dir.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"dtype {cfg.model.dtype}")  # fmt: skip
    print(f"batch: {args.samples} prompts x n={args.n} = {args.samples * args.n} episodes, max new tokens "
          f"{t1}/{t2}, images {size[0]}x{size[1]}, {args.repeats} timed batches per engine")  # fmt: skip
    print(f"{'engine':8} {'episodes/s':>11} {'tokens/s':>10} {'s/batch':>8} {'tok/episode':>12}")
    for name, m in results.items():
        print(f"{name:8} {m['episodes_per_s']:11.2f} {m['tokens_per_s']:10.1f} {m['mean_batch_s']:8.2f} "
              f"{m['generated_tokens_per_episode']:12.1f}")  # fmt: skip
    ratios = {}
    if {"hf", "vllm"} <= results.keys():
        for key in ("episodes_per_s", "tokens_per_s"):
            ratios[key] = results["vllm"][key] / results["hf"][key]
        print(
            f"vLLM / HF: episodes/s x{ratios['episodes_per_s']:.2f}, tokens/s x{ratios['tokens_per_s']:.2f}"
        )
    if sync_s:
        median = statistics.median(sync_s)
        print(f"weight sync (trainer -> vLLM, {len(sync_s)} pushes): median {median:.3f} s, "
              f"first {sync_s[0]:.3f} s; vLLM start-up {startup['vllm']:.1f} s")  # fmt: skip
    if device == "cuda" and "vllm" in results:
        lo, hi = PUBLISHED_TOKENS_PER_GPU
        rate = results["vllm"]["tokens_per_s"]
        print(f"vLLM tokens/s per GPU: {rate:.0f} (published single-turn 7B VLM GRPO rollouts on H100: "
              f"~{lo:,}-{hi:,})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "args": vars(args), "results": results, "ratios": ratios,
            "weight_sync_s": sync_s, "startup_s": startup,
        }, indent=2) + "\n")  # fmt: skip
    for eng in built.values():
        eng.close()


if __name__ == "__main__":
    main()
