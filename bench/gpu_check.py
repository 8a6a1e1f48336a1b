"""Short MGPO training on one GPU with the 7B's shapes: ZeRO-3 bf16, vLLM colocated with sleep mode, as the product.

A randomly initialised Qwen2.5-VL with Qwen2.5-VL-7B's dimensions (``bench_rollout.seven_b_dir``: hidden 3584, 28
layers, vision depth 32; the offline tokenizer's 448-row vocabulary) is saved once, then ``MGPOTrainer`` (the
pipeline's trainer, in-process, one rank) trains it for ``--steps`` RL steps after ``--warmup`` untimed ones with
the vLLM engine (``enable_sleep_mode``, prefix caching, CUDA graphs, weights pushed after every update) and the
paper's image sizes. Prints and writes (``--json``) per step: generated tokens/s/GPU, step time and its phases,
peak GPU memory, and MFU = model FLOPs / (time × peak bf16 FLOP/s), with model FLOPs counted as
2·N per forward token and 6·N per trained (forward + backward) token (N = parameters; attention FLOPs left out,
as EasyR1/verl's estimators also roughly do at these lengths), over the whole step (rollout decode + prefill,
reference, update), for the tokens the model really runs (``tokens_run``: a shared prompt once per micro-batch);
``mfu_padded_equivalent`` counts every sequence token in every pass instead (verl's convention). ``--cpu-smoke`` runs the same code on CPU with the tiny model (ZeRO-3 fp32,
vLLM-CPU; sleep mode is a no-op there) to check the script without a GPU.

    python bench/gpu_check.py --json gpu-train.json                 # on the GPU machine (bench/gpu_check.sh)
    DS_ACCELERATOR=cpu .venv/bin/python bench/gpu_check.py --cpu-smoke --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak per GPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2, help="timed RL steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps first (CUDA graphs, allocator)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, nargs=2, default=(256, 128), metavar=("TURN1", "TURN2"))
    p.add_argument("--text-layers", type=int, default=28, help="7B: 28 (fewer to fit a smaller GPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="vLLM's share of the GPU")
    p.add_argument("--offload-optimizer", type=int, default=1, help="ZeRO-3 optimizer states on the host")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: check the script")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="further config overrides, e.g. algorithm.shared_prompt=false (the padded-batch A/B run)",
    )  # fmt: skip
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def model_dir(args: argparse.Namespace, work: Path) -> Path:
    """The tiny checkpoint (``--cpu-smoke``) or a saved random-init bf16 model with the 7B's dimensions."""
    from mgpo_core.modeling.tiny import tiny_model_dir

    tiny = tiny_model_dir(work / "models", seed=0)
    if args.cpu_smoke:
        return tiny
    import bench_rollout
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = work / "models" / f"random-qwen2.5-vl-7b-dims-L{args.text_layers}"
    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return out
    bench_rollout.SEVEN_B_TEXT["num_hidden_layers"] = args.text_layers
    bench_rollout.seven_b_dir(tiny, out)
    cfg = Qwen2_5_VLConfig.from_pretrained(out)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def overrides(args: argparse.Namespace, work: Path, mdir: Path) -> list[str]:
    t1, t2 = args.max_new_tokens
    o = [
        f"model.path={mdir}",
        f"state_dir={work / 'state'}",
        "tracking.mlflow_tracking_uri=http://127.0.0.1:9",  # nothing is sent
        "rollout.engine=vllm",
        f"rollout.n={args.n}",
        f"rollout.max_new_tokens_turn1={t1}",
        f"rollout.max_new_tokens_turn2={t2}",
        f"rollout.max_response_tokens={t1 + t2 + 64}",
        f"algorithm.prompts_per_step={args.prompts}",
        f"algorithm.mini_batch_prompts={args.prompts}",  # one optimiser step per RL step: on-policy
        f"algorithm.micro_batch_size={args.micro_batch}",
        f"algorithm.total_steps={args.warmup + args.steps}",
        "algorithm.kl_coef=0.01",
        "deepspeed.zero_stage=3",
        "checkpoint.every_steps=1000000",
        "checkpoint.export_hf=false",
        f"data.synthetic_train={max(16, args.prompts)}",
    ]
    if args.cpu_smoke:
        return o + ["deepspeed.bf16=false", "model.dtype=float32", "rollout.min_pixels=3136",
                    "rollout.max_pixels=12544"]  # fmt: skip
    return o + [
        "deepspeed.bf16=true",
        "model.dtype=bfloat16",
        "model.gradient_checkpointing=true",
        "model.attn_implementation=sdpa",
        "rollout.min_pixels=200704",
        "rollout.max_pixels=1003520",
        "rollout.enforce_eager=false",
        "rollout.enable_sleep_mode=true",
        f"rollout.gpu_memory_utilization={args.gpu_memory_utilization}",
        "rollout.max_model_len=8192",
        f"deepspeed.offload_optimizer={'true' if args.offload_optimizer else 'false'}",
        "data.synthetic_width=2048",
        "data.synthetic_height=1536",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.cpu_smoke else "cuda")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --cpu-smoke)")
    from mgpo_core.config import load_config
    from mgpo_core.data.splits import load_training_samples
    from mgpo_core.training.trainer import MGPOTrainer

    work = Path(args.workdir or "/tmp/mgpo-gpu-check").resolve()
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    mdir = model_dir(args, work)
    model_s = time.perf_counter() - t
    cfg = load_config("tiny-cpu", overrides(args, work, mdir) + list(args.set))
    shutil.rmtree(work / "run", ignore_errors=True)
    t = time.perf_counter()
    trainer = MGPOTrainer(cfg, work / "run", load_training_samples(cfg), progress=False)
    setup_s = time.perf_counter() - t
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.policy.parameters())
    captured: list[Any] = []
    generate = trainer.rollout.generate_episodes

    def capture(*a: Any, **kw: Any) -> Any:
        captured[:] = generate(*a, **kw)
        return captured

    trainer.rollout.generate_episodes = capture  # type: ignore[method-assign]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    rows = []
    for i in range(args.warmup + args.steps):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        m = trainer.train_step()
        step_s = time.perf_counter() - t0
        trainer.step += 1
        gen = int(sum(int(torch.isfinite(ep.rollout_logprobs).sum()) for ep in captured))
        seq = sum(ep.length for ep in captured)
        run = int(m["perf/forward_tokens"])  # a shared prompt once per micro-batch, as the update ran it
        trained = int(sum(float(ep.loss_mask.sum()) for ep in captured))
        # Forward tokens: rollout (prefill + decode; the n samples share the prompt's prefill through the prefix
        # cache and turn 2 reuses turn 1's), reference forward, update forward + backward (3×). MFU counts the
        # tokens the model really runs (each shared prompt once per micro-batch with packing); the padded
        # equivalent (every sequence token in every pass, as verl counts) is reported beside it.
        passes = 1 + (1 if cfg.algorithm.kl_coef > 0 else 0) + 3
        flops, flops_padded = 2 * n_params * run * passes, 2 * n_params * seq * passes
        row = {
            "step": i,
            "timed": i >= args.warmup,
            "step_s": step_s,
            "generated_tokens": gen,
            "sequence_tokens": seq,
            "tokens_run": run,
            "trained_tokens": trained,
            "generated_tokens_per_s_per_gpu": gen / step_s,
            "rollout_generated_tokens_per_s": m.get("perf/generated_tokens_per_s"),
            "mfu": (flops / step_s / peak) if peak else None,
            "mfu_padded_equivalent": (flops_padded / step_s / peak) if peak else None,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30
            if torch.cuda.is_available()
            else None,
            **{k: v for k, v in m.items() if k.startswith("timing/")},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    timed = [r for r in rows if r["timed"]] or rows
    summary = {
        "gpu": gpu,
        "parameters": n_params,
        "model_build_s": model_s,
        "trainer_setup_s": setup_s,
        "step_s_mean": sum(r["step_s"] for r in timed) / len(timed),
        "generated_tokens_per_s_per_gpu": sum(r["generated_tokens"] for r in timed)
        / sum(r["step_s"] for r in timed),
        "mfu_mean": None if peak is None else sum(r["mfu"] for r in timed) / len(timed),
        "mfu_padded_equivalent_mean": None
        if peak is None
        else sum(r["mfu_padded_equivalent"] for r in timed) / len(timed),
        "tokens_run_per_step": sum(r["tokens_run"] for r in timed) / len(timed),
        "sequence_tokens_per_step": sum(r["sequence_tokens"] for r in timed) / len(timed),
        "peak_gpu_mem_gib": max((r["peak_gpu_mem_gib"] or 0) for r in rows) or None,
        "args": vars(args),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "steps": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
