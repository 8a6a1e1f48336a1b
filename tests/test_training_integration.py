"""Training end to end: the reward is learned, two ranks train and resume, ZeRO-3 exports an HF checkpoint,
and an unreachable MLflow server neither stops training nor loses a metric."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgpo_core.config import load_config
from mgpo_core.episodes import TURN1_TOKEN, Episode
from mgpo_core.training.launch import free_port

pytestmark = pytest.mark.slow

SMALL = [
    "rollout.min_pixels=3136",
    "rollout.max_pixels=12544",
    "rollout.engine=hf",
    "data.synthetic_width=448",
    "data.synthetic_height=336",
]


def _first_token_in_half(tiny_vocab: int):  # noqa: ANN202
    """A reward the random tiny model hits about half the time and can learn: turn 1 starts with a token from a
    fixed random half of the text vocabulary. Learning it proves sign, masking and advantages end to end."""
    chosen = set(random.Random(0).sample(range(tiny_vocab), tiny_vocab // 2))

    def reward(ep: Episode) -> float:
        gen = ep.input_ids[ep.turn_index == TURN1_TOKEN]
        return float(len(gen) > 0 and int(gen[0]) in chosen)

    return reward


def test_mean_reward_rises_on_a_learnable_task(tmp_path, tiny_bundle):
    from mgpo_core.data.splits import load_training_samples
    from mgpo_core.training.rewards import REWARDS
    from mgpo_core.training.trainer import MGPOTrainer

    REWARDS.setdefault("test_first_token_half", _first_token_in_half(tiny_bundle.special.endoftext))
    cfg = load_config(
        "tiny-cpu",
        [
            *SMALL,
            f"state_dir={tmp_path}",
            f"tracking.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "algorithm.reward=test_first_token_half",
            "algorithm.total_steps=24",
            "algorithm.prompts_per_step=4",
            "algorithm.mini_batch_prompts=4",
            "algorithm.micro_batch_size=16",
            "rollout.n=8",
            "rollout.max_new_tokens_turn1=2",
            "rollout.max_new_tokens_turn2=1",
            "optimizer.lr=1e-2",
            "algorithm.kl_coef=0.0",
            "algorithm.entropy_coef=0.0",
            "checkpoint.every_steps=100",
            "checkpoint.export_hf=false",
            "data.synthetic_train=8",
        ],
    )
    trainer = MGPOTrainer(cfg, tmp_path / "run", load_training_samples(cfg), progress=False)
    trainer.train()
    rewards = [
        json.loads(x)["metrics"]["reward/mean"]
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    print(
        f"reward per step: {[round(r, 2) for r in rewards]}; first 6 mean {first:.3f}, last 6 mean {last:.3f}"
    )
    assert last > first + 0.25 and last > 0.8, f"reward did not rise: {[round(r, 2) for r in rewards]}"


def _torchrun(run_dir: Path, state: Path, extra: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "mgpo_core.training.entry",
        "--config",
        "tiny-cpu",
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]
    for s in [
        *SMALL,
        f"state_dir={state}",
        f"tracking.mlflow_tracking_uri=sqlite:///{state}/mlflow.db",
        "algorithm.prompts_per_step=2",
        "algorithm.mini_batch_prompts=2",
        "algorithm.micro_batch_size=2",
        "rollout.n=2",
        "rollout.max_new_tokens_turn1=6",
        "rollout.max_new_tokens_turn2=4",
        "checkpoint.every_steps=1",
        "data.synthetic_train=4",
        *extra,
    ]:
        cmd += ["--set", s]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_ranks_train_checkpoint_and_resume(tmp_path):
    run_dir = tmp_path / "ws2"
    p = _torchrun(run_dir, tmp_path, ["algorithm.total_steps=2"])
    assert p.returncode == 0, p.stderr[-4000:]
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["steps_done"] == 2
    ck = Path(m["checkpoint"])
    assert (ck / "rng_rank000.pt").exists() and (ck / "rng_rank001.pt").exists()
    # Extend the same run directory by one step: both ranks resume, exactly one step is trained.
    p = _torchrun(run_dir, tmp_path, ["algorithm.total_steps=3"])
    assert p.returncode == 0, p.stderr[-4000:]
    m3 = json.loads((run_dir / "manifest.json").read_text())
    assert m3["steps_done"] == 3 and m3["steps_run_this_process"] == 1
    assert m3["mlflow_run_id"] == m["mlflow_run_id"], "the resumed run reattaches to its MLflow run"
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        m["mlflow_run_id"], "reward/mean"
    )
    assert sorted(h.step for h in hist) == [1, 2, 3], "rank 0 alone logs, once per step"
    # Another algorithm setting is refused with a clear message instead of silently mixing two runs.
    p = _torchrun(run_dir, tmp_path, ["algorithm.total_steps=4", "algorithm.kl_coef=0.5"])
    assert p.returncode != 0 and "another config" in p.stderr


def test_zero3_bf16_run_from_a_sharded_base_exports_the_trained_weights_and_vllm_loads_them(tmp_path):
    """From a base laid out as Qwen2.5-VL-7B-Instruct (5 shards + index, 152,064 rows), ZeRO-3 in bf16 trains a
    step and exports: the export holds the TRAINED weights (compared with DeepSpeed's own fp32 consolidation of
    the checkpoint, an independent path), no stale index of the base, and loads in transformers and in vLLM."""
    from safetensors.torch import load_file

    from mgpo_core.modeling.base import base_model_for
    from mgpo_core.modeling.like import build_like
    from mgpo_core.modeling.loading import load_model
    from mgpo_core.training.select import checkpoint_state_dict

    base = build_like(tmp_path / "base", base_model_for(tmp_path / "cache", seed=0))
    assert len(list(base.glob("model-*-of-*.safetensors"))) >= 3
    run_dir = tmp_path / "z3"
    cmd = [sys.executable, "-m", "mgpo_core.training.entry", "--config", "tiny-cpu", "--run-dir", str(run_dir),
           "--no-progress"]  # fmt: skip
    for s in [
        *SMALL,
        f"model.path={base}",
        f"state_dir={tmp_path}",
        f"tracking.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "deepspeed.zero_stage=3",
        "deepspeed.bf16=true",
        "model.dtype=bfloat16",
        "algorithm.total_steps=1",
        "algorithm.prompts_per_step=2",
        "algorithm.mini_batch_prompts=2",
        "algorithm.micro_batch_size=2",
        "algorithm.kl_coef=0.01",
        "optimizer.lr=1e-3",
        "rollout.n=2",
        "rollout.max_new_tokens_turn1=4",
        "rollout.max_new_tokens_turn2=2",
        "model.gradient_checkpointing=true",
        "checkpoint.every_steps=1",
    ]:
        cmd += ["--set", s]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    p = subprocess.run(cmd, env=dict(env, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    export = run_dir / "hf_export"
    assert not list(export.glob("*.index.json")) or all(
        (export / f).is_file()
        for idx in export.glob("*.index.json")
        for f in set(json.loads(idx.read_text())["weight_map"].values())
    ), "the export carries a weight index naming files it does not have"
    exported: dict[str, torch.Tensor] = {}
    for f in export.glob("*.safetensors"):
        exported.update(load_file(f))
    trained = checkpoint_state_dict(next((run_dir / "checkpoints").glob("step-*")))
    original = {}
    for f in base.glob("model-*.safetensors"):
        original.update(load_file(f))
    moved = 0
    for name, want in trained.items():
        # transformers writes the published checkpoint names: model.language_model.* -> model.*, model.visual.*
        # -> visual.* (the base's shards use them too).
        key = name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        got = exported[key].float()
        # bf16 export of the fp32 master weights: one bf16 rounding (relative 2^-8) apart at most.
        torch.testing.assert_close(got, want.float().to(torch.bfloat16).float(), rtol=2**-8, atol=0)
        moved += int(not torch.equal(got, original[key].float()))
    assert moved > 0.5 * len(trained), f"only {moved} of {len(trained)} tensors differ from the base"
    model = load_model(export, dtype="float32")
    assert model.get_input_embeddings().weight.shape[0] == 152_064
    code = (
        "import sys; from vllm import LLM, SamplingParams\n"
        "llm = LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, max_model_len=512,\n"
        "          kv_cache_memory_bytes=1<<28, limit_mm_per_prompt={'image': 0, 'video': 0})\n"
        "out = llm.generate({'prompt_token_ids': [151644, 872, 198]}, SamplingParams(max_tokens=2))\n"
        "print('VLLM_OK', len(out[0].outputs[0].token_ids))\n"
    )
    v = subprocess.run([sys.executable, "-c", code, str(export)], env=dict(env, VLLM_LOGGING_LEVEL="ERROR"),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert "VLLM_OK 2" in v.stdout, (v.stdout + v.stderr)[-4000:]


def test_launch_streams_the_log_returns_the_manifest_and_reports_failures(tmp_path):
    from mgpo_core.training.launch import TrainingFailed, launch_training

    base = [
        *SMALL,
        f"state_dir={tmp_path}",
        f"tracking.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "algorithm.total_steps=1",
        "algorithm.prompts_per_step=2",
        "algorithm.mini_batch_prompts=2",
        "algorithm.micro_batch_size=4",
        "rollout.n=2",
        "rollout.max_new_tokens_turn1=4",
        "rollout.max_new_tokens_turn2=2",
        "checkpoint.export_hf=false",
    ]
    lines: list[str] = []
    manifest = launch_training(load_config("tiny-cpu", base), tmp_path / "ok", on_line=lines.append)
    assert manifest["status"] == "completed" and manifest["steps_done"] == 1
    assert any('"status": "completed"' in x for x in lines), "the trainer's output is streamed line by line"
    assert (tmp_path / "ok" / "train.log").read_text().count("completed") >= 1
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(TrainingFailed, match="config.json"):
        launch_training(load_config("tiny-cpu", [*base, f"model.path={empty}"]), tmp_path / "bad")


_PRINTER = """
import sys
from mgpo_core.training.entry import line_atomic_output
line_atomic_output()
for i in range(20000):
    print(f"RESULT rank={sys.argv[1]} i={i} " + "x" * 40)
"""


def test_two_ranks_printing_to_one_pipe_never_merge_lines(tmp_path):
    """Ranks share the launcher's pipe with PYTHONUNBUFFERED set (as launch_training does); without line-atomic
    output ~40 % of such lines merged on 2 cores. Every line must arrive whole."""
    script = tmp_path / "printer.py"
    script.write_text(_PRINTER)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = f'"{sys.executable}" {script} 0 & "{sys.executable}" {script} 1; wait'
    out = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=120).stdout
    lines = out.splitlines()
    bad = [x for x in lines if x.count("RESULT") != 1]
    assert len(lines) == 40000 and not bad, (len(lines), bad[:3])


def test_a_stalled_run_is_ended_and_fails_naming_the_phase(tmp_path, monkeypatch):
    """An injected hang after step 1 (as a hung collective would): the group is killed after the stall timeout
    and the failure names the step and the phase it stalled in; a retry may help, so the classifier says retry."""
    import time

    from mgpo_core.training.launch import TrainingStalled, launch_training
    from tasks.retry import classify

    monkeypatch.setenv("MGPO_HANG", "rollout:2")
    hooks = str(Path(__file__).parent / "fault_hooks")  # the crash hooks are a test-only sitecustomize
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [hooks, os.environ.get("PYTHONPATH")])))
    cfg = load_config(
        "tiny-cpu",
        [
            *SMALL,
            f"state_dir={tmp_path}",
            f"tracking.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "algorithm.total_steps=3",
            "algorithm.prompts_per_step=2",
            "algorithm.mini_batch_prompts=2",
            "algorithm.micro_batch_size=4",
            "rollout.n=2",
            "rollout.max_new_tokens_turn1=4",
            "rollout.max_new_tokens_turn2=2",
            "checkpoint.export_hf=false",
            "deepspeed.stall_timeout_s=8",
        ],
    )
    steps: list[int] = []
    with pytest.raises(TrainingStalled) as err:
        launch_training(cfg, tmp_path / "hang", on_step=lambda s, m: steps.append(s), timeout_s=60)
    assert steps == [1], "step 1 was journaled, step 2 hung"
    assert "no RL step finished for" in str(err.value) and "rank 0: step 2: rollout" in str(err.value), str(err.value)
    assert classify(err.value).retry
    time.sleep(1)
    alive = [
        p.name
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and str(tmp_path / "hang") in _cmdline(p)
    ]
    assert alive == [], "the whole process group was ended"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_checkpoint_selection_evaluates_every_kth_checkpoint_logs_the_curve_and_picks_the_best(tmp_path):
    from mlflow.tracking import MlflowClient

    from mgpo_core.modeling.loading import load_model
    from mgpo_core.training.launch import launch_training
    from tasks.stages import _select_checkpoint

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sel")).info.run_id
    cfg = load_config(
        "tiny-cpu",
        [
            *SMALL,
            f"state_dir={tmp_path}",
            f"tracking.mlflow_tracking_uri={uri}",
            "algorithm.total_steps=3",
            "algorithm.prompts_per_step=2",
            "algorithm.mini_batch_prompts=2",
            "algorithm.micro_batch_size=4",
            "rollout.n=2",
            "rollout.max_new_tokens_turn1=4",
            "rollout.max_new_tokens_turn2=2",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=1",
            "checkpoint.select_every=2",
            "evaluation.limit=2",
            "evaluation.max_new_tokens=4",
        ],
    )
    run_dir = tmp_path / "run"
    manifest = launch_training(cfg, run_dir, mlflow_run_id=run_id)
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert kept == ["step-000002", "step-000003"], "every 2nd checkpoint survives keep_last=1"
    sel = _select_checkpoint(cfg, run_dir, manifest, None)
    assert sorted(sel.curve) == [2, 3] and sel.best_step in (2, 3)
    hist = client.get_metric_history(run_id, "select/eval/synthetic/overall")
    assert {h.step: h.value for h in hist} == pytest.approx(sel.curve), "the curve is on the training run"
    exported = load_model(run_dir / "selection" / "step-000002")  # the converted DeepSpeed checkpoint loads
    final = load_model(run_dir / "hf_export")
    differs = [n for (n, a), (_, b) in zip(exported.named_parameters(), final.named_parameters(), strict=True)
               if not torch.equal(a, b)]  # fmt: skip
    assert differs, "step 2's weights are not the final ones"
    assert json.loads((run_dir / "selection.json").read_text())["best_step"] == sel.best_step
    _selection_picks_the_known_best(cfg, run_dir, manifest)


def _selection_picks_the_known_best(cfg, run_dir: Path, manifest: dict) -> None:  # noqa: ANN001
    """The same run's checkpoints under curves with a known best: the evaluation callback first finds, by the
    weights, which training step the directory it is handed holds, then returns that step's score on the curve."""
    from mgpo_core.modeling.loading import load_model
    from mgpo_core.modeling.source import model_dir_for
    from mgpo_core.training.select import checkpoint_state_dict, select_checkpoint

    states = {s: checkpoint_state_dict(run_dir / "checkpoints" / f"step-{s:06d}") for s in (2, 3)}

    def step_of(hf_dir: Path) -> int:
        params = dict(load_model(hf_dir, dtype="float32").named_parameters())
        same = {s: all(torch.equal(p, st[n].float()) for n, p in params.items()) for s, st in states.items()}
        hits = [s for s, equal in same.items() if equal]
        assert len(hits) == 1, f"{hf_dir} holds the weights of steps {hits}"
        return hits[0]

    seen: list[int] = []
    for curve, best in [({2: 0.75, 3: 0.25}, 2), ({2: 0.25, 3: 0.5}, 3), ({2: 0.5, 3: 0.5}, 3)]:

        def scores(hf_dir: Path, out: Path, curve=curve) -> dict[str, float]:
            seen.append(step_of(hf_dir))
            return {cfg.evaluation.promotion_metric: curve[seen[-1]]}

        sel = select_checkpoint(cfg, run_dir, Path(manifest["hf_export"]), base_dir=model_dir_for(cfg),
                                evaluate_dir=scores)  # fmt: skip
        assert (sel.best_step, sel.curve) == (best, curve), "peak then decay: the peak; a tie: the later step"
        assert step_of(sel.best_dir) == best
        assert json.loads((run_dir / "selection.json").read_text())["best_step"] == best
    assert seen == [2, 3] * 3, "every candidate evaluated once per selection, in step order"
