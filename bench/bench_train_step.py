"""Training-step benchmark: our two-turn MGPO RL step against TRL's single-turn ``GRPOTrainer`` on the same tiny
Qwen2.5-VL, the same prompts and the same group size, each in its own process, measured in one run.

Usage: ``.venv/bin/python bench/bench_train_step.py [--steps 5 --warmup 1 --repeats 2 --sides ...] [--out r.json]``.
Prints a Markdown table (seconds and CPU seconds per RL step, peak RSS, generated tokens per step, time per
generated token, the ours/TRL ratios, the per-phase split) and, with ``--out``, writes every raw number as JSON.
Each side runs in its own child process, ``--repeats`` times, rotating which side goes first; the timed steps of
all repeats are pooled.

Sides (``--sides``, default all five): ``ours-vllm`` is the product: ``MGPOTrainer`` as the pipeline runs it, with
the vLLM engine in-process (prefix caching across the two turns; the weight push after the update is part of the
step); ``ours-vllm-unpacked`` the same with ``algorithm.shared_prompt=false`` (each prompt run once per rollout,
the padded batch); ``ours-hf`` the product's trainer generating with HF ``generate`` on the trained module (turn 2
re-prefills the whole conversation); ``trl`` TRL's ``GRPOTrainer`` single-turn, prompt without a system turn;
``trl-sys`` the same with our MGPO system prompt in TRL's prompt too, so the remaining difference is the second
turn itself.

What is compared. One RL step = ``--prompts`` prompts × ``--n`` rollouts → rewards → group advantages → old and
reference log-probs → PPO-clip updates in ``prompts / mini-batch-prompts`` optimiser steps (micro-batch
``--micro-batch``), AdamW with the same lr / weight decay / betas / eps / grad-clip, KL coefficient = TRL's beta,
fp32 on CPU. Ours (DeepSpeed ZeRO-2, world size 1): two assistant turns (turn 1 with the overview image, turn 2
with a second image: the crop or the overview again); the first mini-batch is on-policy (no old-log-prob pass),
the reference pass is fused into the update's micro-batch loop, micro-batches are length-bucketed, and each
micro-batch runs the prompt its rollouts share once (shared-prompt packing). TRL: one turn
with the same overview image and the question + choices, ``max_completion_length`` = turn-1 + turn-2 budgets.
Generated tokens are counted from what each side really sampled (the random tiny model may stop early). vLLM runs
in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so its CPU time is in the process's CPU time.

Peak memory is ``ru_maxrss`` of each child process (whole life) and ``VmHWM`` over the timed steps only (the
high-water mark is reset through ``/proc/self/clear_refs`` after the warm-up, where Linux allows it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from any folder
    sys.path.insert(0, str(ROOT))

UNREACHABLE_MLFLOW = "http://127.0.0.1:9"  # discard port: tracking is skipped at once, metrics stay local


# -- memory and machine helpers -------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """Whole-process peak resident set (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_hwm() -> bool:
    """Reset this process's RSS high-water mark so ``window_hwm_mib`` covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in _read("/proc/cpuinfo").splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def loadavg() -> list[float]:
    return [float(x) for x in _read("/proc/loadavg").split()[:3]] or [float("nan")] * 3


# -- our side -------------------------------------------------------------------------------------------------------
def our_overrides(spec: dict[str, Any], state_dir: Path, engine: str = "hf") -> list[str]:
    """The tiny-cpu preset turned into the benchmark's fixed batch (also read by the TRL child for lr & co.)."""
    return [
        f"model.path={spec['model_dir']}",
        f"state_dir={state_dir}",
        f"tracking.mlflow_tracking_uri={UNREACHABLE_MLFLOW}",
        f"rollout.engine={engine}",
        f"rollout.n={spec['n']}",
        f"rollout.max_new_tokens_turn1={spec['turn1_tokens']}",
        f"rollout.max_new_tokens_turn2={spec['turn2_tokens']}",
        f"rollout.min_pixels={spec['min_pixels']}",
        f"rollout.max_pixels={spec['max_pixels']}",
        f"algorithm.prompts_per_step={spec['prompts']}",
        f"algorithm.mini_batch_prompts={spec['mini_batch_prompts']}",
        f"algorithm.micro_batch_size={spec['micro_batch']}",
        f"algorithm.total_steps={spec['warmup'] + spec['steps']}",
        f"algorithm.kl_coef={spec['kl_coef']}",
        f"algorithm.seed={spec['seed']}",
        f"optimizer.lr={spec['lr']}",
        "deepspeed.zero_stage=2",
        "deepspeed.bf16=false",
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        "checkpoint.every_steps=1000000",
        "checkpoint.export_hf=false",
    ]


def sampled_tokens(episodes: list[Any], turn: int) -> int:
    """Tokens the engine really sampled in one turn: they carry a finite rollout log-prob (a forced
    ``<|im_end|>`` and the environment's tokens carry NaN)."""
    import torch

    return sum(int((torch.isfinite(ep.rollout_logprobs) & (ep.turn_index == turn)).sum()) for ep in episodes)


def run_ours(spec: dict[str, Any], work: Path, engine: str, *, shared_prompt: bool = True) -> dict[str, Any]:
    """Warm up, then time ``steps`` calls of ``MGPOTrainer.train_step`` and one ``save()`` separately.

    ``engine`` ``vllm`` is the product: the pipeline's vLLM engine (in-process, prefix caching across the two
    turns, the weights pushed after every update inside the step); ``hf`` generates with the trained module.
    ``shared_prompt`` False runs the padded batch (each prompt once per rollout) instead of packed rows."""
    t = time.perf_counter()  # set-up = imports + model, reference model, engine and optimiser construction
    import torch

    torch.set_num_threads(spec["threads"])

    from mgpo_core.config import load_config
    from mgpo_core.data.synthetic import read_samples_jsonl
    from mgpo_core.episodes import TURN1_TOKEN, TURN2_TOKEN
    from mgpo_core.training.trainer import MGPOTrainer

    name = f"ours-{engine}" + ("" if shared_prompt else "-unpacked")
    overrides = [*our_overrides(spec, work / f"{name}-state", engine), f"algorithm.shared_prompt={shared_prompt}"]
    cfg = load_config("tiny-cpu", overrides)
    run_dir = work / f"{name}-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a checkpoint left by an earlier run would be resumed
    trainer = MGPOTrainer(cfg, run_dir, read_samples_jsonl(spec["samples"]), progress=False)
    setup_s = time.perf_counter() - t
    captured: list[Any] = []
    generate = trainer.rollout.generate_episodes

    def capture(*a: Any, **kw: Any) -> Any:  # the trainer does not return its episodes: keep the last batch
        captured[:] = generate(*a, **kw)
        return captured

    trainer.rollout.generate_episodes = capture  # type: ignore[method-assign]

    def one_step() -> tuple[float, float, dict[str, float]]:
        t0, c0 = time.perf_counter(), time.process_time()
        m = trainer.train_step()
        trainer.step += 1  # what train() does between steps: the next rollout seed differs
        return time.perf_counter() - t0, time.process_time() - c0, m

    for _ in range(spec["warmup"]):
        one_step()
    hwm_reset = reset_hwm()
    steps = []
    for _ in range(spec["steps"]):
        dt, cpu, m = one_step()
        t1, t2 = sampled_tokens(captured, TURN1_TOKEN), sampled_tokens(captured, TURN2_TOKEN)
        steps.append(
            {
                "step_s": dt,
                "cpu_s": cpu,
                "rollout_s": m["timing/rollout_s"],
                "logprobs_s": m["timing/old_ref_logprobs_s"],
                "update_s": m["timing/update_s"],
                "sync_s": m["timing/weight_sync_s"],
                "generated_tokens": t1 + t2,
                "generated_turn1": t1,
                "generated_turn2": t2,
                "trained_tokens": int(sum(float(ep.loss_mask.sum()) for ep in captured)),
                "episodes": len(captured),
                "turn1_hit_max": sum(ep.finish_reasons[0] == "length" for ep in captured),
                "turn2_hit_max": sum(ep.finish_reasons[1] == "length" for ep in captured),
                "valid_boxes": sum(ep.valid_box for ep in captured),
                "prompt_tokens_turn1": statistics.mean(ep.prompt_len for ep in captured),
                "sequence_tokens": sum(ep.length for ep in captured),
            }
        )
    window_hwm = window_hwm_mib() if hwm_reset else None
    t = time.perf_counter()
    trainer.save()
    checkpoint_s = time.perf_counter() - t
    return {
        "side": "ours",
        "setup_s": setup_s,
        "steps": steps,
        "checkpoint_s": checkpoint_s,
        "peak_rss_mib": peak_rss_mib(),
        "window_hwm_mib": window_hwm,
    }


# -- TRL's side -----------------------------------------------------------------------------------------------------
def trl_prompt(sample: Any, system_prompt: str | None) -> list[dict[str, Any]]:
    """One user turn: the overview image, the question, the choices and where to put the answer letter
    (after our MGPO system prompt when ``system_prompt`` is given, to tell prompt length from turn structure)."""
    from mgpo_core.data.schema import format_choices

    text = (
        f"{sample.question}\nThe choices are listed below:\n{format_choices(sample.choices)}\n"
        "Put the letter of your final answer inside \\boxed{}."
    )
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    if system_prompt is None:
        return [user]
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, user]


def run_trl(spec: dict[str, Any], work: Path, system_prompt: bool) -> dict[str, Any]:
    """Single-turn GRPO with TRL on the same model, prompts, group size, optimiser and budgets; time RL steps."""
    t = time.perf_counter()  # set-up = imports + data, processor, model and trainer construction
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mgpo_core.config import load_config
    from mgpo_core.data.synthetic import read_samples_jsonl
    from mgpo_core.imaging import open_image, resize_for_model
    from mgpo_core.modeling.loading import load_model, load_processor
    from mgpo_core.reward import answer_reward

    cfg = load_config("tiny-cpu", our_overrides(spec, work / "trl-state"))
    o, a, r = cfg.optimizer, cfg.algorithm, cfg.rollout
    rows = []
    for s in read_samples_jsonl(spec["samples"]):
        # The same overview as our turn 1 (already a multiple of 28, so the processor keeps its size).
        with open_image(s.image_path) as original:
            overview = resize_for_model(
                original, min_pixels=r.min_pixels, max_pixels=r.max_pixels, resample=r.overview_resample
            )
        system = r.system_prompt if system_prompt else None
        rows.append({"prompt": trl_prompt(s, system), "image": overview, "answer": s.answer})

    def reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [answer_reward([t], ans) for t, ans in zip(texts, answer, strict=True)]

    opt_per_rl = a.prompts_per_step // a.mini_batch_prompts
    total_rl = spec["warmup"] + spec["steps"]
    args = GRPOConfig(
        output_dir=str(work / "trl-out"),
        use_cpu=True,
        report_to=[],
        seed=a.seed,
        per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=a.mini_batch_prompts * r.n // a.micro_batch_size,
        steps_per_generation=a.prompts_per_step * r.n // a.micro_batch_size,
        num_generations=r.n,
        num_iterations=a.ppo_epochs,
        max_completion_length=r.max_new_tokens_turn1 + r.max_new_tokens_turn2,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=0,
        beta=a.kl_coef,
        epsilon=a.clip_low,
        epsilon_high=a.clip_high,
        loss_type="dapo",  # token-mean over the mini-batch, like ours
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        max_grad_norm=o.grad_clip,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_steps=total_rl * opt_per_rl,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        bf16=False,
        use_vllm=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    processor = load_processor(spec["model_dir"])
    model = load_model(spec["model_dir"], dtype=cfg.model.dtype)
    marks: dict[str, Any] = {"ends": [], "hwm_reset": False, "logs": []}
    warm_opt_steps = spec["warmup"] * opt_per_rl

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["begin"] = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            marks["ends"].append((time.perf_counter(), time.process_time()))
            if state.global_step == warm_opt_steps:
                marks["hwm_reset"] = reset_hwm()
            if state.global_step == total_rl * opt_per_rl:
                marks["window_hwm"] = window_hwm_mib()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            marks["opt_t0"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            marks.setdefault("optimizer_s", []).append(time.perf_counter() - marks["opt_t0"])

        def on_log(self, args, state, control, logs=None, **kw):
            marks["logs"].append({"step": state.global_step, **(logs or {})})

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[Clock()],
    )
    setup_s = time.perf_counter() - t
    # Instance-level wrappers (TRL itself is untouched): _generate = rollout; _generate_and_score_completions =
    # rollout + rewards + old/ref log-probs, once per RL step; training_step = one micro-batch (the first of an
    # RL step also generates and scores).
    gens: list[dict[str, Any]] = []
    micro: list[float] = []

    def timed(fn: Any, record: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            record(time.perf_counter() - t0, out)
            return out

        return wrapper

    trainer._generate = timed(
        trainer._generate,
        lambda dt, out: gens.append(
            {"rollout_s": dt, "lengths": [len(c) for c in out[1]], "prompt_ids": out[0]}
        ),
    )
    trainer._generate_and_score_completions = timed(
        trainer._generate_and_score_completions, lambda dt, _: gens[-1].update(prepare_s=dt)
    )
    trainer.training_step = timed(trainer.training_step, lambda dt, _: micro.append(dt))
    trainer.train()

    ends = [marks["begin"], *marks["ends"]]
    if len(gens) != total_rl or len(ends) != total_rl * opt_per_rl + 1 or len(micro) % total_rl:
        raise RuntimeError(
            f"TRL ran {len(gens)} generations and {len(ends) - 1} optimiser steps; expected {total_rl} and "
            f"{total_rl * opt_per_rl}: its batching no longer matches one generation per RL step"
        )
    max_len = args.max_completion_length
    micro_per_rl = len(micro) // total_rl
    steps = []
    for i in range(spec["warmup"], total_rl):
        g = gens[i]
        (t_end, c_end), (t_start, c_start) = ends[(i + 1) * opt_per_rl], ends[i * opt_per_rl]
        step_s = t_end - t_start
        # training_step = (generation + scoring on the first micro-batch) + forward/backward; then optimiser steps.
        update_s = sum(micro[i * micro_per_rl : (i + 1) * micro_per_rl]) - g["prepare_s"]
        update_s += sum(marks["optimizer_s"][i * opt_per_rl : (i + 1) * opt_per_rl])
        steps.append(
            {
                "step_s": step_s,
                "cpu_s": c_end - c_start,
                "rollout_s": g["rollout_s"],
                # rewards, image re-processing, old + reference log-probs:
                "logprobs_s": g["prepare_s"] - g["rollout_s"],
                "update_s": update_s,
                "generated_tokens": sum(g["lengths"]),
                "episodes": len(g["lengths"]),
                "hit_max": sum(n >= max_len for n in g["lengths"]),
                "prompt_tokens": statistics.mean(len(p) for p in g["prompt_ids"]),
                "sequence_tokens": sum(len(p) for p in g["prompt_ids"]) + sum(g["lengths"]),
            }
        )
    # Cross-check our count against what TRL logs (one completions/mean_length per generation).
    logged = [x["completions/mean_length"] for x in marks["logs"] if "completions/mean_length" in x]
    counted = [statistics.mean(g["lengths"]) for g in gens]
    if len(logged) == len(counted) and any(abs(x - y) > 1e-6 for x, y in zip(logged, counted, strict=True)):
        raise RuntimeError(
            f"generated-token count {counted} disagrees with TRL's logged mean lengths {logged}"
        )
    return {
        "side": "trl",
        "setup_s": setup_s,
        "steps": steps,
        "logged_mean_lengths": logged,
        "peak_rss_mib": peak_rss_mib(),
        "window_hwm_mib": marks.get("window_hwm") if marks["hwm_reset"] else None,
    }


# -- the parent: data, children, table ------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from mgpo_core.data.synthetic import write_synthetic_split
    from mgpo_core.modeling.tiny import tiny_model_dir

    model_dir = tiny_model_dir(work / "models", seed=args.seed)
    samples = write_synthetic_split(
        work / "data",
        args.prompts,
        seed=args.seed,
        width=args.width,
        height=args.height,
        overview_max_pixels=args.max_pixels,
    )
    spec = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "child", "spec", "result")}
    spec["sides"] = list(args.sides)
    spec.update(model_dir=str(model_dir), samples=str(samples))
    return spec


def run_child(side: str, spec_path: Path, work: Path, threads: int) -> dict[str, Any]:
    result = work / f"{side}-result.json"
    log_path = work / f"{side}.log"
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONHASHSEED="0",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side]
    cmd += ["--spec", str(spec_path), "--result", str(result)]
    before = loadavg()
    t = time.perf_counter()
    with log_path.open("w") as log:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if p.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(
            f"the {side} benchmark process failed (exit {p.returncode}); log {log_path}:\n{tail}"
        )
    out = json.loads(result.read_text())
    out.update(wall_s=time.perf_counter() - t, loadavg_before=before, loadavg_after=loadavg())
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the timed steps of every repeat of one side: means, medians, per-token costs and peaks."""
    steps = [s for r in runs for s in r["steps"]]
    k = len(steps)
    wall, cpu = sum(s["step_s"] for s in steps), sum(s["cpu_s"] for s in steps)
    tokens = sum(s["generated_tokens"] for s in steps)
    seq = sum(s["sequence_tokens"] for s in steps)
    hwm = [r["window_hwm_mib"] for r in runs if r["window_hwm_mib"] is not None]
    out = {
        "timed_steps": k,
        "s_per_step_mean": wall / k,
        "s_per_step_median": statistics.median(s["step_s"] for s in steps),
        "s_per_step_min": min(s["step_s"] for s in steps),
        "cpu_s_per_step_mean": cpu / k,
        "generated_tokens_per_step": tokens / k,
        "s_per_generated_token": wall / max(tokens, 1),
        "s_per_generated_token_median": statistics.median(
            s["step_s"] / max(s["generated_tokens"], 1) for s in steps
        ),
        "cpu_s_per_generated_token": cpu / max(tokens, 1),
        "sequence_tokens_per_step": seq / k,
        "s_per_sequence_token": wall / max(seq, 1),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "timed_window_hwm_mib": max(hwm) if hwm else None,
        "setup_s": statistics.mean(r["setup_s"] for r in runs),
    }
    phases = ("rollout_s", "logprobs_s", "update_s", "sync_s")
    for key in phases:
        if key in steps[0]:
            out[key] = statistics.mean(s[key] for s in steps)
    out["other_s"] = out["s_per_step_mean"] - sum(out.get(p, 0.0) for p in phases)
    if "checkpoint_s" in runs[0]:
        out["checkpoint_s"] = statistics.mean(r["checkpoint_s"] for r in runs)
    return out


def _f(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, fmt)


METRIC_ROWS: tuple[tuple[str, str, str, float], ...] = (
    # (label, summary key, format, scale)
    ("s per RL step (mean)", "s_per_step_mean", ".2f", 1.0),
    ("s per RL step (median)", "s_per_step_median", ".2f", 1.0),
    ("s per RL step (fastest)", "s_per_step_min", ".2f", 1.0),
    ("CPU s per RL step (mean, all threads)", "cpu_s_per_step_mean", ".2f", 1.0),
    ("generated tokens per RL step", "generated_tokens_per_step", ".1f", 1.0),
    ("**ms per generated token** (total time / total tokens)", "s_per_generated_token", ".1f", 1e3),
    ("ms per generated token (median over steps)", "s_per_generated_token_median", ".1f", 1e3),
    ("CPU ms per generated token", "cpu_s_per_generated_token", ".1f", 1e3),
    (
        "sequence tokens per RL step (prompts + inserted turn + generated)",
        "sequence_tokens_per_step",
        ".0f",
        1.0,
    ),
    ("ms per sequence token", "s_per_sequence_token", ".2f", 1e3),
    ("peak RSS, whole process (MiB)", "peak_rss_mib", ".0f", 1.0),
    ("peak RSS, timed steps only (MiB)", "timed_window_hwm_mib", ".0f", 1.0),
    ("set-up: imports, models, trainer (s)", "setup_s", ".1f", 1.0),
)


SIDES = {
    "ours-vllm": "MGPO, vLLM (product)",
    "ours-vllm-unpacked": "MGPO, vLLM, prompt not shared",
    "ours-hf": "MGPO, HF engine",
    "trl": "TRL GRPO (1 turn)",
    "trl-sys": "TRL + our system prompt",
}
RATIOS = (
    ("ours-vllm", "trl"),
    ("ours-vllm", "trl-sys"),
    ("ours-hf", "trl"),
    ("ours-hf", "trl-sys"),
    ("ours-vllm", "ours-vllm-unpacked"),
)


def table(spec: dict[str, Any], summ: dict[str, dict[str, Any]], raw: dict[str, Any]) -> str:
    """The Markdown report: one column per side, the ours/TRL ratios, the phase split, token details, verdict."""
    sides = [s for s in SIDES if s in summ]
    pairs = [(a, b) for a, b in RATIOS if a in summ and b in summ]

    def ratio(a: str, b: str, key: str) -> str:
        x, y = summ[a].get(key), summ[b].get(key)
        return "" if x is None or y is None or y == 0 else f"{x / y:.2f}"

    budget = spec["turn1_tokens"] + spec["turn2_tokens"]
    n_timed = {s: summ[s]["timed_steps"] for s in sides}
    lines = [
        f"Fixed batch: {spec['prompts']} prompts × n={spec['n']}, {spec['prompts'] // spec['mini_batch_prompts']} "
        f"optimiser steps per RL step (micro-batch {spec['micro_batch']}), budgets ours {spec['turn1_tokens']}+"
        f"{spec['turn2_tokens']} tokens vs TRL {budget}; timed RL steps per side {n_timed} after "
        f"{spec['warmup']} warm-up, {spec['repeats']} rotating run(s), {spec['threads']} torch thread(s) per "
        "process.",
        "",
        "| metric | "
        + " | ".join(SIDES[s] for s in sides)
        + " | "
        + " | ".join(f"{a}/{b}" for a, b in pairs)
        + " |",
        "|---|" + "---|" * (len(sides) + len(pairs)),
    ]
    for label, key, fmt, scale in METRIC_ROWS:
        cells = [_f(summ[s].get(key), fmt, scale) for s in sides]
        rcells = ["" if key == "setup_s" else ratio(a, b, key) for a, b in pairs]
        lines.append(f"| {label} | " + " | ".join(cells + rcells) + " |")
    phase_rows = (
        ("rollout (generate)", "rollout_s"),
        (
            "old log-probs (ours: mini-batches after the first; TRL: + ref, rewards, image re-processing)",
            "logprobs_s",
        ),
        ("update (ours: + fused reference pass; forward, backward, optimiser)", "update_s"),
        ("weight sync (vLLM push; HF and TRL generate with the trained module)", "sync_s"),
        ("other (rewards, metrics; TRL: data, logging)", "other_s"),
        ("checkpoint (one `trainer.save()`, outside the step)", "checkpoint_s"),
    )
    lines += ["", "| phase, s per RL step (mean) | " + " | ".join(SIDES[s] for s in sides) + " |"]
    lines.append("|---|" + "---|" * len(sides))
    for label, key in phase_rows:
        lines.append(f"| {label} | " + " | ".join(_f(summ[s].get(key), ".3f") for s in sides) + " |")
    lines.append("")
    for side in sides:
        st = [x for r in raw[side] for x in r["steps"]]
        eps = sum(x["episodes"] for x in st)
        if side.startswith("ours"):
            lines.append(
                f"- {SIDES[side]}: generated per episode turn 1 {sum(x['generated_turn1'] for x in st) / eps:.1f} "
                f"(reached the {spec['turn1_tokens']}-token cap: {sum(x['turn1_hit_max'] for x in st) / eps:.0%}), "
                f"turn 2 {sum(x['generated_turn2'] for x in st) / eps:.1f} (reached {spec['turn2_tokens']}: "
                f"{sum(x['turn2_hit_max'] for x in st) / eps:.0%}), valid boxes "
                f"{sum(x['valid_boxes'] for x in st) / eps:.0%}, turn-1 prompt "
                f"{statistics.mean(x['prompt_tokens_turn1'] for x in st):.0f} tokens, whole episode "
                f"{sum(x['sequence_tokens'] for x in st) / eps:.0f}."
            )
        else:
            lines.append(
                f"- {SIDES[side]}: generated per episode {sum(x['generated_tokens'] for x in st) / eps:.1f} "
                f"(reached {budget}: {sum(x['hit_max'] for x in st) / eps:.0%}), prompt "
                f"{statistics.mean(x['prompt_tokens'] for x in st):.0f} tokens, whole episode "
                f"{sum(x['sequence_tokens'] for x in st) / eps:.0f}."
            )
    lines.append("")
    for a, b in pairs:
        verdicts = []
        for label, key in (
            ("wall, total", "s_per_generated_token"),
            ("wall, median", "s_per_generated_token_median"),
            ("CPU", "cpu_s_per_generated_token"),
        ):
            holds = summ[a][key] <= summ[b][key]
            verdicts.append(f"{label}: {'holds' if holds else 'does NOT hold'} ({ratio(a, b, key)})")
        lines.append(f"Per generated token, {a} ≤ {b}: " + "; ".join(verdicts) + ".")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--prompts", type=int, default=4, help="prompts per RL step (the fixed batch)")
    p.add_argument("--n", type=int, default=4, help="rollouts per prompt (group size; TRL num_generations)")
    p.add_argument("--mini-batch-prompts", type=int, default=2, help="prompts per optimiser step")
    p.add_argument("--micro-batch", type=int, default=4, help="episodes per forward/backward")
    p.add_argument("--turn1-tokens", type=int, default=32, help="our turn-1 budget")
    p.add_argument("--turn2-tokens", type=int, default=16, help="our turn-2 budget (TRL gets turn1 + turn2)")
    p.add_argument("--steps", type=int, default=5, help="timed RL steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps first")
    p.add_argument(
        "--repeats", type=int, default=2, help="alternate ours/TRL this many times, pooling the steps"
    )
    p.add_argument("--width", type=int, default=1024, help="synthetic original width")
    p.add_argument("--height", type=int, default=768, help="synthetic original height")
    p.add_argument("--min-pixels", type=int, default=12544)
    p.add_argument("--max-pixels", type=int, default=50176)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl-coef", type=float, default=0.01, help="our kl_coef = TRL's beta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads of each child; 1 keeps CPU time free of OpenMP spin-waits on a shared machine",
    )
    p.add_argument(
        "--sides",
        type=lambda x: [v for v in x.split(",") if v],
        default=list(SIDES),
        help="comma-separated, from "
        + ",".join(SIDES)
        + " (default: all; trl-sys: TRL's prompt also carries our "
        "MGPO system prompt)",
    )
    p.add_argument("--workdir", default=None, help="keep models, data and logs here (default: a temp folder)")
    p.add_argument("--out", default=None, help="write the raw numbers as JSON to this path")
    p.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = []
    if args.prompts % args.mini_batch_prompts:
        problems.append(
            f"--mini-batch-prompts {args.mini_batch_prompts} must divide --prompts {args.prompts}"
        )
    if (args.mini_batch_prompts * args.n) % args.micro_batch:
        problems.append(f"--micro-batch {args.micro_batch} must divide mini-batch-prompts × n")
    if args.n < 2 or args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        problems.append("need --n >= 2, --steps >= 1, --warmup >= 0, --repeats >= 1")
    if not args.sides or set(args.sides) - set(SIDES):
        problems.append(f"--sides must name some of {','.join(SIDES)}")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        work = Path(spec["work"])
        if args.child.startswith("ours"):
            engine, _, variant = args.child.removeprefix("ours-").partition("-")
            result = run_ours(spec, work, engine, shared_prompt=variant != "unpacked")
        else:
            result = run_trl(spec, work, system_prompt=args.child == "trl-sys")
        Path(args.result).write_text(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        spec = prepare(args, work)
        spec["work"] = str(work)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        sides = list(args.sides)
        raw: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for rep in range(args.repeats):
            order = sides[rep % len(sides) :] + sides[: rep % len(sides)]  # rotate who goes first
            for side in order:
                print(f"[bench] repeat {rep + 1}/{args.repeats}: {side} …", file=sys.stderr, flush=True)
                raw[side].append(run_child(side, spec_path, work, args.threads))
        summ = {side: summarise(raw[side]) for side in sides}
        text = table(spec, summ, raw)
        print(text)
        if args.out:
            from importlib.metadata import PackageNotFoundError, version

            versions: dict[str, str | None] = {}
            for pkg in ("torch", "transformers", "trl", "deepspeed", "accelerate"):
                try:
                    versions[pkg] = version(pkg)
                except PackageNotFoundError:
                    versions[pkg] = None
            doc = {
                "command": " ".join(sys.argv),
                "machine": machine(),
                "versions": versions,
                "spec": spec,
                "summary": summ,
                "runs": raw,
                "table": text,
            }
            Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
