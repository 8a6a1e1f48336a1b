"""The miniature reproduction of the paper's result: MGPO vs single-turn GRPO vs an ablation, side by side.

From the same tiny base model (pre-trained on synthetic grounding and reading, never on MGPO's conversation), the
same synthetic train set, the same RL steps, rollouts per prompt and optimiser settings, each arm is trained
through the production entry point (``python -m mgpo_core.training.entry``, DeepSpeed, the configured rollout
engine) for every seed:

- ``mgpo``: two turns, loss over the model's tokens of both turns (the paper's method);
- ``grpo``: one turn answering from the overview alone, also asked for the box (the paper's GRPO baseline);
- ``final_turn``: two turns, loss over the answer turn only (ablation: no multi-turn mask, so the box is never
  trained by the reward).

Per step (MLflow, experiment ``mgpo-reproduction``, and each run directory's ``metrics.jsonl``): reward,
valid-box ratio, IoU with the ground-truth box, box-contains-target rate; every ``--eval-every`` steps a greedy
validation on a held-out synthetic split (different random stream), and the same validation on a split from the
held-out geometry band (``val_heldout/*``: aspect ratios and sizes no training image has, docs/REPRODUCTION.md).
Output: ``curves.png`` (valid-box ratio and validation accuracy against RL steps for every arm, like the paper's
figure; held-out geometry dashed), ``summary.json``, a Markdown table and the issue-29 targets on stdout.

    .venv/bin/python bench/reproduce.py                      # 2 seeds x 3 arms, 30 steps (docs/REPRODUCTION.md)
    .venv/bin/python bench/reproduce.py --seeds 3 4 --data-seed 7 --out /tmp/repro
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS: dict[str, list[str]] = {
    "mgpo": [],
    "grpo": ["rollout.mode=single_turn"],
    "final_turn": ["algorithm.loss_turns=final"],
}
COLOURS = {"mgpo": (214, 39, 40), "grpo": (31, 119, 180), "final_turn": (44, 160, 44)}
LABELS = {
    "mgpo": "MGPO (two turns, both trained)",
    "grpo": "GRPO (single turn)",
    "final_turn": "ablation: final turn only",
}


def arm_overrides(args: argparse.Namespace, arm: str, seed: int) -> list[str]:
    return [
        f"run_name=repro-{arm}-seed{seed}",
        f"state_dir={args.state}",
        f"algorithm.seed={seed}",
        f"algorithm.total_steps={args.steps}",
        f"algorithm.prompts_per_step={args.prompts}",
        f"algorithm.mini_batch_prompts={args.prompts}",
        f"rollout.n={args.n}",
        f"rollout.engine={args.engine}",
        f"data.shuffle_seed={args.data_seed}",
        f"data.synthetic_train={args.train_size}",
        f"data.synthetic_eval={args.eval_size}",
        f"evaluation.during_training_every={args.eval_every}",
        f"evaluation.during_training_limit={args.eval_size}",
        f"evaluation.during_training_heldout={'false' if args.no_heldout else 'true'}",
        f"checkpoint.every_steps={args.steps}",
        "checkpoint.keep_last=1",
        "tracking.experiment_name=mgpo-reproduction",
        f"tracking.log_episodes_every={args.eval_every}",
        *ARMS[arm],
        *args.set,
    ]


def run_arm(args: argparse.Namespace, arm: str, seed: int) -> Path:
    from mgpo_core.config import load_config, save_config

    run_dir = Path(args.out) / f"{arm}-seed{seed}"
    if (run_dir / "manifest.json").is_file() and not args.fresh:
        print(f"[{arm} seed {seed}] done before, reusing {run_dir}", flush=True)
        return run_dir
    cfg = load_config(args.preset, arm_overrides(args, arm, seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = save_config(cfg, run_dir / "arm.yaml")
    t0 = time.perf_counter()
    print(f"[{arm} seed {seed}] training {args.steps} steps -> {run_dir}", flush=True)
    log_path = run_dir / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [
                sys.executable,
                "-u",
                "-m",
                "mgpo_core.training.entry",
                "--config",
                str(cfg_path),
                "--run-dir",
                str(run_dir),
                "--no-progress",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")},
        )
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise SystemExit(
            f"[{arm} seed {seed}] training failed (exit {proc.returncode}); log {log_path}:\n"
            + "\n".join(tail)
        )
    print(f"[{arm} seed {seed}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from the run's durable metrics journal (last value per step wins)."""
    series: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        step = int(rec["step"])
        for k, v in rec["metrics"].items():
            series.setdefault(k, {})[step] = float(v)
    return {k: sorted(d.items()) for k, d in series.items()}


def smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    out = []
    for i, (s, _) in enumerate(points):
        chunk = [v for _, v in points[max(0, i - window + 1) : i + 1]]
        out.append((s, sum(chunk) / len(chunk)))
    return out


def draw_curves(results: dict[str, dict[int, dict]], path: Path, steps: int, window: int) -> Path:
    """Two panels (valid-box ratio of the sampled turn-1 boxes; greedy validation accuracy) vs RL step."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    panels = [
        ("rollout/valid_box_ratio", f"valid-box ratio (sampled rollouts, {window}-step mean)", window),
        ("val/accuracy", "validation accuracy (greedy; dashed: held-out geometry)", 1),
        ("rollout/box_contains_target", f"box contains the target (sampled, {window}-step mean)", window),
    ]
    pw, ph, m = 420, 300, 48
    img = Image.new("RGB", (len(panels) * pw, ph + 70), "white")
    d = ImageDraw.Draw(img)
    for pi, (key, title, win) in enumerate(panels):
        x0, y0 = pi * pw + m, 30
        w, h = pw - m - 16, ph - 60
        d.text((pi * pw + m, 8), title, fill="black", font=font)
        d.rectangle([x0, y0, x0 + w, y0 + h], outline=(120, 120, 120))
        for t in range(0, 11, 2):
            y = y0 + h - t / 10 * h
            d.line([x0 - 4, y, x0, y], fill="black")
            d.text((x0 - 30, y - 6), f"{t / 10:.1f}", fill="black", font=font)
            d.line([x0, y, x0 + w, y], fill=(235, 235, 235))
        for s in range(0, steps + 1, max(1, steps // 5)):
            x = x0 + s / steps * w
            d.line([x, y0 + h, x, y0 + h + 4], fill="black")
            d.text((x - 6, y0 + h + 6), str(s), fill="black", font=font)
        d.text((x0 + w / 2 - 20, y0 + h + 18), "RL step", fill="black", font=font)
        for arm, by_seed in results.items():
            for res in by_seed.values():
                pts = res["curves"].get(key, [])
                pts = smooth(pts, win) if win > 1 else pts
                xy = [(x0 + s / steps * w, y0 + h - min(1.0, max(0.0, v)) * h) for s, v in pts]
                if len(xy) > 1:
                    d.line(xy, fill=COLOURS[arm], width=2)
                for x, y in xy if win == 1 else []:
                    d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLOURS[arm])
                held = res["curves"].get(key.replace("val/", "val_heldout/"), []) if key.startswith("val/") else []
                hxy = [(x0 + s / steps * w, y0 + h - min(1.0, max(0.0, v)) * h) for s, v in held]
                for (xa, ya), (xb, yb) in zip(hxy, hxy[1:], strict=False):
                    for k in range(0, 10, 2):  # dashed
                        d.line([xa + (xb - xa) * k / 10, ya + (yb - ya) * k / 10,
                                xa + (xb - xa) * (k + 1) / 10, ya + (yb - ya) * (k + 1) / 10], fill=COLOURS[arm], width=2)
                for x, y in hxy:
                    d.rectangle([x - 2, y - 2, x + 2, y + 2], outline=COLOURS[arm])
    for i, arm in enumerate(results):
        x = 20 + i * 300
        d.line([x, ph + 40, x + 24, ph + 40], fill=COLOURS[arm], width=3)
        d.text((x + 30, ph + 34), LABELS[arm] + " (one line per seed)", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def first_last(points: list[tuple[int, float]], k: int) -> tuple[float, float]:
    vals = [v for _, v in points]
    if not vals:
        return float("nan"), float("nan")
    return mean(vals[:k]), mean(vals[-k:])


def summarise(results: dict[str, dict[int, dict]], window: int) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for arm, by_seed in results.items():
        rows = {}
        for seed, res in by_seed.items():
            c = res["curves"]
            vb0, vb1 = first_last(c.get("rollout/valid_box_ratio", []), window)
            ct0, ct1 = first_last(c.get("rollout/box_contains_target", []), window)
            r0, r1 = first_last(c.get("reward/mean", []), window)
            acc = c.get("val/accuracy", [])
            rows[seed] = {
                "valid_box_first": vb0,
                "valid_box_last": vb1,
                "contains_first": ct0,
                "contains_last": ct1,
                "reward_first": r0,
                "reward_last": r1,
                "val_acc_base": acc[0][1] if acc else float("nan"),
                "val_acc_final": acc[-1][1] if acc else float("nan"),
                "val_valid_box_final": (c.get("val/valid_box_ratio") or [(0, float("nan"))])[-1][1],
                "seconds": res["seconds"],
                **heldout_figures(c),
            }
        table[arm] = rows
    return table


HELDOUT_KEYS = ("accuracy", "valid_box_ratio", "out_of_bounds_ratio", "box_contains_target")


def heldout_figures(c: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """``heldout_<metric>_base`` (step 0) and ``heldout_<metric>_final`` (last validation) of ``val_heldout/*``."""
    out = {}
    for k in HELDOUT_KEYS:
        pts = c.get(f"val_heldout/{k}", [])
        out[f"heldout_{k}_base"] = pts[0][1] if pts else float("nan")
        out[f"heldout_{k}_final"] = pts[-1][1] if pts else float("nan")
    return out


def heldout_markdown(table: dict[str, dict]) -> str:
    """The held-out geometry figures per arm and seed, then issue 29's targets per seed (MGPO vs base and GRPO)."""
    lines = [
        "| arm | seed | accuracy (base → final) | valid box (base → final) | out of bounds (final) | "
        "crop holds target (base → final) |\n|---|---|---|---|---|---|"
    ]
    for arm, rows in table.items():
        for seed, r in rows.items():
            lines.append(
                f"| {arm} | {seed} | {r['heldout_accuracy_base']:.3f} → {r['heldout_accuracy_final']:.3f} | "
                f"{r['heldout_valid_box_ratio_base']:.2f} → {r['heldout_valid_box_ratio_final']:.2f} | "
                f"{r['heldout_out_of_bounds_ratio_final']:.2f} | {r['heldout_box_contains_target_base']:.2f} → "
                f"{r['heldout_box_contains_target_final']:.2f} |"
            )
    mgpo, grpo = table.get("mgpo", {}), table.get("grpo", {})
    if mgpo:
        lines += ["", "| seed | target | measured | met |", "|---|---|---|---|"]
        for seed, r in mgpo.items():
            checks = [
                ("valid box ≥ 0.8", r["heldout_valid_box_ratio_final"], r["heldout_valid_box_ratio_final"] >= 0.8),
                ("out of bounds ≤ 0.05", r["heldout_out_of_bounds_ratio_final"],
                 r["heldout_out_of_bounds_ratio_final"] <= 0.05),
                ("crop holds target ≥ 0.6", r["heldout_box_contains_target_final"],
                 r["heldout_box_contains_target_final"] >= 0.6),
                ("accuracy ≥ base + 0.25", r["heldout_accuracy_final"] - r["heldout_accuracy_base"],
                 r["heldout_accuracy_final"] - r["heldout_accuracy_base"] >= 0.25),
            ]
            if seed in grpo:
                gap = r["heldout_accuracy_final"] - grpo[seed]["heldout_accuracy_final"]
                checks.append(("accuracy ≥ GRPO + 0.2", gap, gap >= 0.2))
            lines += [f"| {seed} | {name} | {v:+.3f} | {'yes' if ok else '**no**'} |" for name, v, ok in checks]
    return "\n".join(lines)


def markdown(table: dict[str, dict]) -> str:
    head = (
        "| arm | seed | valid-box (first→last) | box⊇target (first→last) | reward (first→last) | "
        "val acc (base→final) | val valid-box (final) | train time |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for arm, rows in table.items():
        for seed, r in rows.items():
            lines.append(
                f"| {arm} | {seed} | {r['valid_box_first']:.2f} → {r['valid_box_last']:.2f} | "
                f"{r['contains_first']:.2f} → {r['contains_last']:.2f} | {r['reward_first']:.2f} → "
                f"{r['reward_last']:.2f} | {r['val_acc_base']:.3f} → {r['val_acc_final']:.3f} | "
                f"{r['val_valid_box_final']:.2f} | {r['seconds']:.0f} s |"
            )
        finals = [r["val_acc_final"] for r in rows.values()]
        vbs = [r["valid_box_last"] for r in rows.values()]
        lines.append(
            f"| **{arm}** | mean (spread) | last {mean(vbs):.2f} ({min(vbs):.2f}–{max(vbs):.2f}) | | | "
            f"final {mean(finals):.3f} ({min(finals):.3f}–{max(finals):.3f}) | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument(
        "--steps",
        type=int,
        default=30,
        help="RL steps per arm (30, the default run's: 2 seeds x 3 arms take ~16 min on 2 cores)",
    )
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=64, help="held-out questions per validation")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic train and held-out splits")
    p.add_argument(
        "--engine",
        default="vllm",
        choices=["hf", "vllm", "auto"],
        help="rollout engine (the product trains with vLLM)",
    )
    p.add_argument("--preset", default="tiny-base-cpu")
    p.add_argument(
        "--state", default=str(ROOT / ".mgpo"), help="state folder (base model cache, data, MLflow)"
    )
    p.add_argument("--out", default=str(ROOT / ".mgpo" / "reproduce"))
    p.add_argument("--window", type=int, default=5, help="steps averaged for first/last figures and curves")
    p.add_argument("--fresh", action="store_true", help="retrain arms that finished before")
    p.add_argument("--set", action="append", default=[], help="extra config override for every arm")
    p.add_argument("--no-heldout", action="store_true", help="skip the validation on the held-out geometry band")
    args = p.parse_args(argv)

    from mgpo_core.config import load_config
    from mgpo_core.modeling.source import model_dir_for

    t0 = time.perf_counter()
    base = model_dir_for(load_config(args.preset, [f"state_dir={args.state}"]))
    print(f"base model: {base}", flush=True)
    results: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            ts = time.perf_counter()
            run_dir = run_arm(args, arm, seed)
            results.setdefault(arm, {})[seed] = {
                "curves": read_curves(run_dir),
                "seconds": json.loads((run_dir / "manifest.json").read_text()).get(
                    "wall_seconds", time.perf_counter() - ts
                ),
                "run_dir": str(run_dir),
            }
    out = Path(args.out)
    picture = draw_curves(results, out / "curves.png", args.steps, args.window)
    table = summarise(results, args.window)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "table": table,
                "curves": {a: {s: r["curves"] for s, r in v.items()} for a, v in results.items()},
            },
            indent=1,
            default=str,
        )
    )
    print(markdown(table))
    if not args.no_heldout:
        print("\nheld-out geometry (docs/REPRODUCTION.md):\n" + heldout_markdown(table))
    print(f"\npicture {picture}\nsummary {out / 'summary.json'}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
