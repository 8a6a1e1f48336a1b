"""MGPO two-turn vs direct full-resolution evaluation at HR-Bench-8K size: visual tokens and prefill cost
per question, measured side by side in one run; and evaluation throughput (questions/s) per engine and mode.

Part 1 (the method's efficiency claim). Synthetic 7680x4320 images (HR-Bench 8K size) with the paper's pixel
budgets: the MGPO overview and crop use min 256*28^2 / max 1280*28^2 pixels; the direct baseline sees the
image at the model's maximum (12,845,056 pixels = 16,384 visual tokens for Qwen2.5-VL; ``--direct-max-pixels``
changes it). The MGPO sequences are built by the production two-turn driver with a scripted turn 1 (a box
three times the size of the target, around it), so the crop, both images and every token are exactly what an
episode holds; the direct prompt is the evaluator's. Prefill cost = wall time of one forward pass over the
prompt (vision encoder included, no KV cache, logits of the last position only), as the HF engine pays it:
turn 1 over the overview prompt, turn 2 over the whole two-image sequence (HF re-prefills; vLLM's prefix cache
would prefill only the new part, whose token count is printed too). The tiny offline model stands in for the
7B one: its absolute times mean nothing, its token counts are exact, and the time ratio shows how the cost of
the two sequence lengths compares on the same model.

Part 2. ``evaluate()`` on synthetic questions in both modes with the HF engine (and vLLM with ``--vllm``),
greedy, a fixed number of new tokens per turn (the random tiny model rarely stops early): questions/s.

    .venv/bin/python bench/bench_eval.py                       # both parts, 2-core CPU: a few minutes
    .venv/bin/python bench/bench_eval.py --vllm --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PAPER_MIN_PIXELS = 256 * 28 * 28
PAPER_MAX_PIXELS = 1280 * 28 * 28


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2, help="HR-Bench-8K-sized images in part 1")
    p.add_argument("--size", default="7680x4320", help="image size of part 1 (WxH)")
    p.add_argument("--direct-max-pixels", type=int, default=None, help="direct budget (default: model max)")
    p.add_argument("--repeats", type=int, default=1, help="timed prefills per sequence (median is reported)")
    p.add_argument("--throughput-samples", type=int, default=8, help="questions per mode in part 2")
    p.add_argument("--throughput-size", default="2048x1152", help="image size of part 2 (WxH)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per turn in part 2")
    p.add_argument(
        "--throughput-repeats", type=int, default=3, help="timed runs per engine and mode (median)"
    )
    p.add_argument("--vllm", action="store_true", help="also measure part 2 with the vLLM engine")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--workdir", default=None, help="model and images go here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args()


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def _box_around(box: Sequence[float], scale: float, min_side: float, limit: tuple[int, int]) -> list[int]:
    """A box ``scale`` times ``box`` (at least ``min_side``) around its centre, inside ``limit``."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(min_side, scale * max(box[2] - box[0], box[3] - box[1]))
    x1 = int(min(max(0.0, cx - side / 2), limit[0] - side))
    y1 = int(min(max(0.0, cy - side / 2), limit[1] - side))
    return [x1, y1, int(x1 + side), int(y1 + side)]


def _scripted_engine(bundle, cfg, replies: Iterable[str]):
    """A RolloutEngine answering turn 1 with ``replies`` (in order) and turn 2 with a boxed letter."""
    from mgpo_core.episodes import PromptTemplates
    from mgpo_core.rollout import GenerationResult, RolloutEngine, RolloutSettings

    queue = list(replies)

    class Scripted(RolloutEngine):
        name = "scripted"

        def _generate(self, requests, spec, n):
            out = []
            for r in requests:
                text = queue.pop(0) if len(r.images) == 1 else r"\boxed{A}"
                ids = self.prompts.text_ids(text) + [self.special.im_end]
                out.append([GenerationResult(ids, [0.0] * len(ids), "stop")] * n)
            return out

        def sync_weights(self, named_tensors) -> None:
            pass

    return Scripted(
        bundle.tokenizer,
        bundle.image_processor,
        bundle.special,
        PromptTemplates.from_config(cfg.rollout),
        RolloutSettings.from_config(cfg),
    )


def _prefill_s(model, ids, pixel_values, grid, pad: int, repeats: int) -> tuple[float, float]:
    """Median ``(wall seconds, process CPU seconds)`` of one prefill forward; CPU time (all threads of this
    process) is less disturbed than wall time when other processes share the cores."""
    import torch

    ids = ids[None]
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixel_values,
        image_grid_thw=grid,
        mm_token_type_ids=(ids == pad).to(torch.int32),
        use_cache=False,
        logits_to_keep=1,
    )
    wall, cpu = [], []
    with torch.no_grad():
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            model(**kwargs)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def part1(args: argparse.Namespace, work: Path, bundle) -> dict:
    import torch

    from mgpo_core.config import load_config
    from mgpo_core.data.synthetic import iter_synthetic_samples
    from mgpo_core.episodes import TURN2_TOKEN, encode_image
    from mgpo_core.evaluation.direct import DirectPrompt, direct_prompt_ids, model_max_pixels
    from mgpo_core.grounding import map_box_to_model
    from mgpo_core.imaging import open_image, overview_size, resize_for_model

    width, height = _size(args.size)
    cfg = load_config(
        "tiny-cpu",
        [
            f"rollout.min_pixels={PAPER_MIN_PIXELS}",
            f"rollout.max_pixels={PAPER_MAX_PIXELS}",
            "rollout.max_response_tokens=8192",
        ],
    )
    samples = list(
        iter_synthetic_samples(work / "hr8k", args.images, seed=0, width=width, height=height, split="hr8k")
    )
    replies = []
    for s in samples:
        ov = overview_size(width, height, min_pixels=PAPER_MIN_PIXELS, max_pixels=PAPER_MAX_PIXELS)
        gt = map_box_to_model(s.gt_boxes[0], (width, height), ov)
        box = _box_around(gt, 3.0, 2 * 28 + 1, ov)
        replies.append(f'```json\n[{{"bbox_2d": {box}, "label": "tag"}}]\n```')
    episodes = _scripted_engine(bundle, cfg, replies).generate_episodes(samples, n=1, greedy=True)
    budget = args.direct_max_pixels or model_max_pixels(bundle.image_processor)
    prompt = DirectPrompt(
        cfg.evaluation.direct_system_prompt, cfg.evaluation.direct_template, cfg.rollout.choices_header
    )
    model, pad = bundle.model, bundle.special.image_pad

    # warm-up: one small forward so allocator and kernels are ready before anything is timed
    ep0 = episodes[0]
    n1 = int(ep0.image_grid_thw[0].prod())
    _prefill_s(model, ep0.input_ids[: ep0.prompt_len], ep0.pixel_values[:n1], ep0.image_grid_thw[:1], pad, 1)

    rows = []
    for s, ep in zip(samples, episodes, strict=True):
        grid = ep.image_grid_thw
        n1 = int(grid[0].prod())
        t2_start = (
            int((ep.turn_index == TURN2_TOKEN).nonzero()[0])
            if (ep.turn_index == TURN2_TOKEN).any()
            else ep.length
        )
        merge2 = 4
        ov_tokens, crop_tokens = int(grid[0].prod()) // merge2, int(grid[1].prod()) // merge2
        t1, c1 = _prefill_s(
            model, ep.input_ids[: ep.prompt_len], ep.pixel_values[:n1], grid[:1], pad, args.repeats
        )
        t2, c2 = _prefill_s(model, ep.input_ids[:t2_start], ep.pixel_values, grid, pad, args.repeats)
        turn1_end = ep.prompt_len + ep.turn_length(1)
        t0 = time.perf_counter()
        original = open_image(s.image_path)
        image = resize_for_model(original, min_pixels=PAPER_MIN_PIXELS, max_pixels=budget)
        original.close()
        enc = encode_image(bundle.image_processor, image)
        encode_s = time.perf_counter() - t0
        ids = torch.tensor(direct_prompt_ids(_scripted_engine(bundle, cfg, []), prompt, s, enc.n_tokens))
        td, cd = _prefill_s(model, ids, enc.pixel_values, enc.grid_thw[None], pad, args.repeats)
        rows.append(
            {
                "image": Path(s.image_path).name,
                "overview": list(ep.overview_size),
                "crop_box": list(ep.crop_box or ()),
                "crop_image": list(ep.crop_size or ()),
                "mgpo_visual_tokens": ov_tokens + crop_tokens,
                "overview_tokens": ov_tokens,
                "crop_tokens": crop_tokens,
                "mgpo_turn1_prompt_tokens": ep.prompt_len,
                "mgpo_turn2_prompt_tokens": t2_start,
                "mgpo_turn2_new_prompt_tokens": t2_start - turn1_end,
                "mgpo_prefill_turn1_s": t1,
                "mgpo_prefill_turn2_s": t2,
                "mgpo_prefill_s": t1 + t2,
                "mgpo_prefill_turn1_cpu_s": c1,
                "mgpo_prefill_turn2_cpu_s": c2,
                "mgpo_prefill_cpu_s": c1 + c2,
                "direct_image": list(image.size),
                "direct_visual_tokens": enc.n_tokens,
                "direct_prompt_tokens": len(ids),
                "direct_prefill_s": td,
                "direct_prefill_cpu_s": cd,
                "direct_image_encode_s": encode_s,
            }
        )
        print(
            f"  {rows[-1]['image']}: MGPO {ov_tokens}+{crop_tokens} visual tokens, "
            f"prefill {t1:.2f}+{t2:.2f} s (CPU {c1:.2f}+{c2:.2f} s) | "
            f"direct {enc.n_tokens} visual tokens ({image.size[0]}x{image.size[1]}), "
            f"prefill {td:.2f} s (CPU {cd:.2f} s)",
            flush=True,
        )
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], int | float)}
    ratios = {
        "visual_tokens_direct_over_mgpo": mean["direct_visual_tokens"] / mean["mgpo_visual_tokens"],
        "prefill_direct_over_mgpo": mean["direct_prefill_s"] / mean["mgpo_prefill_s"],
        "prefill_direct_over_mgpo_turn1": mean["direct_prefill_s"] / mean["mgpo_prefill_turn1_s"],
        "prefill_cpu_direct_over_mgpo": mean["direct_prefill_cpu_s"] / mean["mgpo_prefill_cpu_s"],
    }
    return {
        "size": [width, height],
        "direct_max_pixels": budget,
        "rows": rows,
        "mean": mean,
        "ratios": ratios,
    }


def part2(args: argparse.Namespace, work: Path, bundle) -> dict:
    from mgpo_core.config import load_config
    from mgpo_core.data.synthetic import iter_synthetic_samples
    from mgpo_core.evaluation.runner import evaluate
    from mgpo_core.rollout.factory import build_rollout_engine
    from mgpo_core.rollout.hf import HFRolloutEngine

    width, height = _size(args.throughput_size)
    overrides = [
        f"rollout.min_pixels={PAPER_MIN_PIXELS}",
        f"rollout.max_pixels={PAPER_MAX_PIXELS}",
        f"evaluation.max_new_tokens={args.max_new_tokens}",
        f"evaluation.batch_size={args.throughput_samples}",
        "evaluation.picture_samples=0",
        f"model.path={bundle.path}",
        f"state_dir={work / 'state'}",
        "rollout.max_model_len=16384",
    ]
    cfg = load_config("tiny-cpu", overrides)
    # Fresh questions for every repeat: vLLM's prefix and image caches would otherwise serve a repeated run.
    n, reps = args.throughput_samples, args.throughput_repeats
    pool = list(
        iter_synthetic_samples(work / "tp", n * reps + 1, seed=1, width=width, height=height, split="tp")
    )
    warm, sets = pool[-1:], [pool[r * n : (r + 1) * n] for r in range(reps)]
    engines = {
        "hf": lambda: HFRolloutEngine.for_bundle(bundle, cfg, batch_size=args.throughput_samples)
    }
    if args.vllm:
        engines["vllm"] = lambda: build_rollout_engine(cfg, "vllm")
    out: dict[str, dict] = {}
    for name, make in engines.items():
        t0 = time.perf_counter()
        engine = make()
        startup = time.perf_counter() - t0
        try:
            evaluate(
                cfg,
                "synthetic",
                engine,
                work / f"warm-{name}",
                mode="mgpo",
                samples=warm,
                progress=False,
            )
            # Modes alternate repeat by repeat (same questions within a repeat) so load from other processes
            # hits both alike; medians are reported.
            runs: dict[str, list] = {"mgpo": [], "direct": []}
            for rep in range(args.throughput_repeats):
                for mode in ("mgpo", "direct"):
                    runs[mode].append(
                        evaluate(
                            cfg,
                            "synthetic",
                            engine,
                            work / f"tp-{name}-{mode}-{rep}",
                            mode=mode,
                            samples=sets[rep],
                            progress=False,
                        )
                    )
            out[name] = {"startup_s": startup}
            for mode, results in runs.items():
                rates = [r.metrics["timing/samples_per_s"] for r in results]
                out[name][mode] = {
                    "samples_per_s": statistics.median(rates),
                    "samples_per_s_runs": rates,
                    "visual_tokens_mean": results[0].metrics["cost/visual_tokens_mean"],
                    "generated_tokens_mean": results[0].metrics["cost/generated_tokens_mean"],
                }
        finally:
            engine.close()
        m, d = out[name]["mgpo"], out[name]["direct"]
        print(
            f"  {name}: MGPO {m['samples_per_s']:.3f} q/s ({m['visual_tokens_mean']:.0f} visual tokens) | "
            f"direct {d['samples_per_s']:.3f} q/s ({d['visual_tokens_mean']:.0f} visual tokens) | "
            f"MGPO/direct {m['samples_per_s'] / d['samples_per_s']:.2f}x",
            flush=True,
        )
    return {
        "size": [width, height],
        "questions": args.throughput_samples,
        "max_new_tokens": args.max_new_tokens,
        "engines": out,
    }


def main() -> None:
    args = parse_args()
    import torch

    from mgpo_core.modeling.loading import load_bundle
    from mgpo_core.modeling.tiny import tiny_model_dir

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-eval-"))
    bundle = load_bundle(tiny_model_dir(work / "models", seed=0))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"machine: {machine}; torch threads {torch.get_num_threads()}")
    result: dict = {"machine": machine}
    if not args.skip_prefill:
        print(f"part 1: MGPO two-turn vs direct full resolution at {args.size}")
        p1 = part1(args, work, bundle)
        result["prefill"] = p1
        m, r = p1["mean"], p1["ratios"]
        print(
            f"  mean visual tokens: MGPO {m['mgpo_visual_tokens']:.0f} "
            f"(overview {m['overview_tokens']:.0f} + crop "
            f"{m['crop_tokens']:.0f}) vs direct {m['direct_visual_tokens']:.0f}: direct/MGPO "
            f"{r['visual_tokens_direct_over_mgpo']:.2f}x"
        )
        print(
            f"  mean prefill: MGPO {m['mgpo_prefill_s']:.2f} s "
            f"(turn 1 {m['mgpo_prefill_turn1_s']:.2f} + turn 2 "
            f"{m['mgpo_prefill_turn2_s']:.2f}) vs direct {m['direct_prefill_s']:.2f} s: direct/MGPO "
            f"{r['prefill_direct_over_mgpo']:.2f}x wall, "
            f"{r['prefill_cpu_direct_over_mgpo']:.2f}x process CPU time"
        )
    if not args.skip_throughput:
        print(
            f"part 2: evaluation throughput at {args.throughput_size}, "
            f"{args.max_new_tokens} new tokens per turn"
        )
        result["throughput"] = part2(args, work, bundle)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
