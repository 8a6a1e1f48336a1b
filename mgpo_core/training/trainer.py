"""The MGPO training loop on DeepSpeed, readable top to bottom (one RL step = rollout → advantages → PPO update).

Per step: draw prompts → two-turn rollouts (n per prompt) → rewards → GRPO advantages → old log-probs (recomputed)
and reference log-probs (frozen initial model; skipped when ``kl_coef`` is 0) → PPO updates over mini-batches with
micro-batch gradient accumulation → push weights to the rollout engine → metrics → checkpoint every k steps.
Works as one plain process or as a rank of a ``deepspeed``/``torchrun`` process group (``RANK``/``WORLD_SIZE``).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mgpo_core.algorithms import grpo_advantages
from mgpo_core.config import MGPOConfig, config_hash, flatten_config, to_yaml
from mgpo_core.config.secrets import redact, redacted_params
from mgpo_core.data.schema import Sample
from mgpo_core.episodes import Episode, PromptTemplates
from mgpo_core.modeling.loading import load_bundle, load_model
from mgpo_core.modeling.source import model_dir_for
from mgpo_core.ops.tracking import MetricsSink, ensure_run, start_node_system_metrics, tracking_uri_for
from mgpo_core.rollout import ENGINES, RolloutEngine, RolloutSettings, resolve_engine_name
from mgpo_core.training import checkpoint as ckpt
from mgpo_core.training.collapse import CollapseMonitor
from mgpo_core.training.distributed import broadcast_from_rank0, init_distributed
from mgpo_core.training.ds_config import build_ds_config
from mgpo_core.training.metrics import rollout_metrics
from mgpo_core.training.rewards import get_reward
from mgpo_core.training.sampler import PromptSampler, SamplerState, shard_for_rank
from mgpo_core.training.update import (
    UpdateSettings,
    forward_tokens,
    micro_batch_order,
    minibatch_update,
    reference_logprobs,
)

log = logging.getLogger(__name__)


def resume_key(cfg: MGPOConfig) -> str:
    """The config hash without what a resumed run may change: the step budget and the checkpoint settings."""
    c = cfg.model_copy(deep=True)
    c.algorithm.total_steps = 1
    c.checkpoint = type(c.checkpoint)()
    return config_hash(c)


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """Sampling seed of one rank's rollouts at one step: independent of when the run was (re)started."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**31 - 1)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lr_lambda(cfg: MGPOConfig) -> Callable[[int], float]:
    """Learning-rate factor per optimiser step: linear warm-up, then constant, cosine or linear decay."""
    import math

    o, a = cfg.optimizer, cfg.algorithm
    total = a.total_steps * a.ppo_epochs * (a.prompts_per_step // a.mini_batch_prompts)

    def f(i: int) -> float:
        if o.warmup_steps and i < o.warmup_steps:
            return (i + 1) / o.warmup_steps
        if o.scheduler == "constant":
            return 1.0
        frac = min(1.0, (i - o.warmup_steps) / max(1, total - o.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * frac)) if o.scheduler == "cosine" else 1.0 - frac

    return f


def build_engine(cfg: MGPOConfig, model: torch.nn.Module, world: int):  # noqa: ANN201
    """``deepspeed.initialize`` on ``model`` with the configured torch optimiser and schedule.

    Returns ``(engine, optimizer, scheduler)``. ``optimizer.name`` is ``adamw`` (the recipe) or ``sgd`` (no
    momentum: the update is ``-lr * clipped gradient``, which tests use to read the gradient off the weights).
    """
    import deepspeed

    o = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(cfg, world)
    )
    return engine, optimizer, scheduler


def build_reference(cfg: MGPOConfig, model_path: Path, device: torch.device, world: int):  # noqa: ANN201
    """The frozen reference model: ``(module, engine)``. Under ZeRO-3 an inference-only DeepSpeed engine shards it
    over the ranks as the policy is (``ds_config.build_reference_ds_config``); otherwise a plain module on
    ``device`` (engine None). Its forward is the module's own (ZeRO-3's hooks gather each layer's weights)."""
    model = load_model(model_path, dtype=cfg.model.dtype, device=str(device),
                       attn_implementation=cfg.model.attn_implementation)  # fmt: skip
    model.requires_grad_(False).eval()
    if cfg.deepspeed.zero_stage != 3:
        return model, None
    import deepspeed

    from mgpo_core.training.ds_config import build_reference_ds_config

    engine, *_ = deepspeed.initialize(model=model, config=build_reference_ds_config(cfg, world))
    engine.eval()
    return engine.module, engine


def rollout_episodes(engine, cfg: MGPOConfig, samples, *, seed: int | None, greedy: bool = False, n: int | None = None):  # noqa: ANN001, ANN201
    """The training rollout ``cfg`` asks for: MGPO's two turns, or the single-turn GRPO baseline.

    With ``algorithm.loss_turns: final`` only the last assistant turn stays in each episode's loss mask (the
    ablation without MGPO's multi-turn mask: turn 1 is context, never trained).
    """
    r = cfg.rollout
    n = r.n if n is None else n
    if r.mode == "single_turn":
        from mgpo_core.rollout.single_turn import generate_single_turn_episodes

        episodes = generate_single_turn_episodes(
            engine,
            samples,
            n,
            system_prompt=r.single_turn_system_prompt,
            template=r.single_turn_template,
            greedy=greedy,
            seed=seed,
        )
    else:
        episodes = engine.generate_episodes(samples, n=n, seed=seed, greedy=greedy)
    if cfg.algorithm.loss_turns == "final" and r.mode != "single_turn":
        from mgpo_core.episodes import TURN2_TOKEN

        for ep in episodes:
            ep.loss_mask = ep.loss_mask * (ep.turn_index == TURN2_TOKEN).to(ep.loss_mask.dtype)
    return episodes


class MGPOTrainer:
    """Owns the DeepSpeed engine, the frozen reference model, the rollout engine, the sampler and the sink."""

    def __init__(
        self,
        cfg: MGPOConfig,
        run_dir: str | Path,
        samples: Sequence[Sample],
        *,
        engine_factory: Callable[..., RolloutEngine] | None = None,
        mlflow_run_id: str | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.dist = init_distributed()
        self.is_main = self.dist.rank == 0
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.algorithm.seed)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.ckpt_root)
            # The run's record: secrets (variables named like passwords, URI user-info) masked (config/secrets.py).
            (self.run_dir / "config.yaml").write_text(redact(to_yaml(cfg)), encoding="utf-8")

        self.model_path = model_dir_for(cfg)  # model.path, or the offline tiny model model.tiny names
        bundle = load_bundle(
            self.model_path,
            dtype=cfg.model.dtype,
            device=str(self.device),
            attn_implementation=cfg.model.attn_implementation,
        )
        self.tokenizer, self.special = bundle.tokenizer, bundle.special
        model = bundle.model
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.ref_model = None
        self.ref_engine = None  # under ZeRO-3, the engine that owns the reference's partitions (kept alive with it)
        if cfg.algorithm.kl_coef > 0:  # the frozen INITIAL policy, also after a resume
            self.ref_model, self.ref_engine = build_reference(cfg, self.model_path, self.device, self.dist.world)

        self.engine, self.optimizer, self.scheduler = build_engine(cfg, model, self.dist.world)
        self.policy = self.engine.module

        templates, settings = PromptTemplates.from_config(cfg.rollout), RolloutSettings.from_config(cfg)
        engine_name = resolve_engine_name(cfg.rollout.engine)
        if engine_factory is None and engine_name == "hf":
            from mgpo_core.rollout.hf import HFRolloutEngine

            self.rollout: RolloutEngine = HFRolloutEngine(
                self.policy, self.tokenizer, bundle.image_processor, self.special, templates, settings
            )
        else:
            factory = engine_factory or ENGINES[engine_name]
            self.rollout = factory(
                cfg=cfg,
                model_dir=self.model_path,
                bundle=bundle,
                templates=templates,
                settings=settings,
                policy=self.policy,
            )
        self.reward_fn = get_reward(cfg.algorithm.reward)
        self.update_settings = UpdateSettings.from_config(cfg, self.special)
        self.coefs = self.update_settings.coefs
        if cfg.rollout.top_p < 1.0 and self.is_main:
            log.warning(
                "rollout.top_p=%s: samples come from the nucleus, while the PPO ratio uses the untruncated "
                "tempered distribution (as verl and TRL do); see docs/TRAINING.md, 'Log-probs'",
                cfg.rollout.top_p,
            )

        self.step = 0
        self.sampler = PromptSampler(samples, seed=cfg.algorithm.seed)
        self._val_samples: dict[str, list] | None = None
        self.mlflow_run_id = mlflow_run_id or cfg.tracking.run_id
        self.uri = tracking_uri_for(cfg)
        self._resume()
        if self.step > 0 and getattr(self.rollout, "model", None) is not self.policy:
            self._sync_rollout_weights()  # a separate engine starts from the base weights: push the resumed ones
        self.sink: MetricsSink | None = None
        self.collapse = CollapseMonitor.from_journal(self.run_dir / "metrics.jsonl", self.step)
        if self.is_main:
            self.mlflow_run_id = self._attach_run()
            self.sink = MetricsSink(self.uri, self.mlflow_run_id, self.run_dir)  # samples rank 0's node too
        # Every other node's local rank 0 samples its node into the same run, as system/node<k>-<host>/...
        self.mlflow_run_id = broadcast_from_rank0(self.mlflow_run_id, self.device)
        self.node_monitor = None if self.is_main else start_node_system_metrics(self.uri, self.mlflow_run_id)

    # -- set-up helpers ------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return
        state = ckpt.load_checkpoint(self.engine, latest, rank=self.dist.rank)
        if state.get("resume_key") != resume_key(self.cfg):
            raise RuntimeError(
                f"{self.run_dir} holds a run made with another config (resume key {state.get('resume_key')} ≠ "
                f"{resume_key(self.cfg)}); resume with the same config (only algorithm.total_steps and the "
                "checkpoint settings may change) or start a new run directory"
            )
        self.step = int(state["step"])
        self.sampler.state = SamplerState(**state["sampler"])
        self.mlflow_run_id = self.mlflow_run_id or state.get("mlflow_run_id")
        if self.is_main:
            log.warning(
                "resumed from %s: %d of %d steps done", latest, self.step, self.cfg.algorithm.total_steps
            )

    def _attach_run(self) -> str | None:
        t = self.cfg.tracking
        try:
            run_id = ensure_run(
                self.uri, t.experiment_name, self.cfg.run_name, self.cfg.state_dir, self.mlflow_run_id
            )
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow run could not be created or reattached (%s); metrics stay local", e)
            return self.mlflow_run_id
        if run_id and self.step == 0:
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(self.uri)
                from mlflow.entities import Param

                params = [Param(k, v[:6000]) for k, v in redacted_params(flatten_config(self.cfg)).items()]
                for i in range(0, len(params), 90):
                    client.log_batch(run_id, params=params[i : i + 90])
                client.set_tag(run_id, "mgpo.config_hash", config_hash(self.cfg))
            except Exception as e:  # noqa: BLE001
                log.warning("could not log parameters to MLflow (%s)", e)
        return run_id

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        a = self.cfg.algorithm
        bar = None
        if self.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=a.total_steps, initial=self.step, desc="MGPO", unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        self.steps_run = 0
        every = self.cfg.evaluation.during_training_every
        if every and self.step == 0 and self.sink is not None:
            self.sink.log(self.validate(), 0)  # the curve starts at the base model
        while self.step < a.total_steps:
            t0 = time.perf_counter()
            last = self.train_step()
            self.step += 1
            self.steps_run += 1
            self.phase("logging the step", self.step)
            ckpt.fault_point("step-done", self.step)
            if every and (self.step % every == 0 or self.step == a.total_steps):
                self.phase("validation", self.step)
                last.update(self.validate())
            timing_ckpt = 0.0
            if self.step % self.cfg.checkpoint.every_steps == 0 or self.step == a.total_steps:
                tc = time.perf_counter()
                self.phase("checkpoint", self.step)
                self.save()
                timing_ckpt = time.perf_counter() - tc
            last["timing/checkpoint_s"] = timing_ckpt
            last["timing/step_s"] = time.perf_counter() - t0
            last.update(self.collapse.update(last))  # collapse/* signals (mgpo_core/training/collapse.py)
            if self.sink is not None:
                self.sink.log(last, self.step)
            if bar is not None:
                bar.set_postfix(
                    reward=f"{last['reward/mean']:.3f}",
                    valid_box=f"{last['rollout/valid_box_ratio']:.2f}",
                    step_s=f"{last['timing/step_s']:.1f}",
                )
                bar.update(1)
        if bar is not None:
            bar.close()
        return self.finish(last)

    def phase(self, name: str, step: int) -> None:
        """Record what this rank is doing (``<run_dir>/phase-rank<r>``, one short line): a stalled run's error
        names the phase it hung in (``training.launch``)."""
        try:
            (self.run_dir / f"phase-rank{self.dist.rank}").write_text(f"step {step}: {name}\n")
        except OSError:
            pass

    def validate(self) -> dict[str, float]:
        """Greedy rollouts in the training mode on the validation split: ``val/*`` metrics (rank 0's view)."""
        if not self.is_main:
            return {}
        from mgpo_core.training.metrics import grounding_quality

        if self._val_samples is None:
            from mgpo_core.data.splits import validation_sets

            self._val_samples = validation_sets(self.cfg)
        t = time.perf_counter()
        self.rollout.wake()
        m: dict[str, float] = {}
        for prefix, samples in self._val_samples.items():
            episodes = rollout_episodes(self.rollout, self.cfg, samples, seed=0, greedy=True, n=1)
            n = max(1, len(episodes))
            m.update({
                f"{prefix}/accuracy": sum(ep.reward > 0.5 for ep in episodes) / n,
                f"{prefix}/valid_box_ratio": sum(ep.valid_box for ep in episodes) / n,
                f"{prefix}/out_of_bounds_ratio": sum(ep.grounding.reason == "out_of_bounds" for ep in episodes) / n,
                **{f"{prefix}/{k}": v for k, v in grounding_quality(episodes).items()},
            })
        self.rollout.sleep()
        m["timing/validation_s"] = time.perf_counter() - t
        return m

    def train_step(self) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.algorithm
        batch_prompts = self.sampler.next_batch(a.prompts_per_step)
        mine = shard_for_rank(batch_prompts, self.dist.rank, self.dist.world)
        m: dict[str, float] = {}

        t = time.perf_counter()
        self.phase("rollout", self.step + 1)
        ckpt.fault_point("rollout", self.step + 1)
        self.rollout.wake()
        episodes = rollout_episodes(
            self.rollout, cfg, mine, seed=rollout_seed(a.seed, self.step, self.dist.rank)
        )
        self.rollout.sleep()
        m["timing/rollout_s"] = time.perf_counter() - t
        for ep in episodes:
            ep.reward = self.reward_fn(ep)
        rewards = torch.tensor([ep.reward for ep in episodes], dtype=torch.float32)
        adv = grpo_advantages(rewards, torch.tensor([ep.group for ep in episodes]), eps=a.adv_eps)
        m.update(rollout_metrics(episodes, adv))
        tr = cfg.tracking
        if tr.log_episodes_every and self.is_main and (self.step + 1) % tr.log_episodes_every == 0:
            from mgpo_core.training.episode_log import log_episodes

            log_episodes(
                episodes,
                adv.tolist(),
                self.step + 1,
                run_dir=self.run_dir,
                k=tr.log_episodes,
                tracking_uri=self.uri,
                run_id=self.mlflow_run_id,
            )

        minis = self._mini_batches(episodes, adv)
        m["perf/sequence_tokens"] = float(sum(ep.length for ep in episodes))
        m["perf/forward_tokens"] = float(forward_tokens(minis, self.update_settings))
        t = time.perf_counter()
        self.phase("old and reference log-probs", self.step + 1)
        old_logp = self._old_logprobs(minis)
        m["timing/old_ref_logprobs_s"] = time.perf_counter() - t

        t = time.perf_counter()
        self.phase("policy update", self.step + 1)
        m.update(self._update(minis, old_logp))
        m["timing/update_s"] = time.perf_counter() - t

        t = time.perf_counter()
        self.phase("weight sync to the rollout engine", self.step + 1)
        if (
            getattr(self.rollout, "model", None) is not self.policy
        ):  # an HF engine on the policy itself shares it
            self._sync_rollout_weights()
        m["timing/weight_sync_s"] = time.perf_counter() - t

        gen_tokens = sum(ep.turn_length(1) + ep.turn_length(2) for ep in episodes)
        m["perf/generated_tokens_per_s"] = gen_tokens / max(m["timing/rollout_s"], 1e-9)
        m["perf/peak_rss_mb"] = _peak_rss_mb()
        if torch.cuda.is_available():
            m["perf/peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        m["optim/lr"] = (
            float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.cfg.optimizer.lr
        )
        # Every rank's metrics describe its own shard; ranks may even have different keys (reason codes seen,
        # IoU only where crops exist): average each key over the ranks that have it.
        if self.dist.world > 1:
            gathered: list[dict[str, float]] = [{} for _ in range(self.dist.world)]
            torch.distributed.all_gather_object(gathered, m)
            keys = sorted({k for g in gathered for k in g})
            m = {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}
        return m

    def _mini_batches(
        self, episodes: list[Episode], adv: torch.Tensor
    ) -> list[tuple[list[Episode], torch.Tensor]]:
        """This rank's mini-batch shares, each in micro-batch order (:func:`micro_batch_order`) with its advantages."""
        a, n = self.cfg.algorithm, self.cfg.rollout.n
        mini_eps = a.mini_batch_prompts // self.dist.world * n
        out = []
        for start in range(0, len(episodes), mini_eps):
            eps = episodes[start : start + mini_eps]
            order = micro_batch_order(eps, self.update_settings)
            out.append(([eps[i] for i in order], adv[start : start + len(eps)][order]))
        return out

    def _old_logprobs(
        self, minis: list[tuple[list[Episode], torch.Tensor]]
    ) -> list[list[torch.Tensor] | None]:
        """Old log-probs (the policy before the update), one list per mini-batch of one tensor per micro-batch.

        Only the mini-batches updated after the RL step's first optimiser step need a separate pass: the first
        one is on-policy (``None``: its update forward's detached log-probs are the old ones, see
        :func:`minibatch_update`), so with one mini-batch per RL step there is no old-log-prob pass at all. The
        reference log-probs are computed inside the update's micro-batch loop (fused).
        """
        return [None] + [
            reference_logprobs(self.policy, None, eps, self.update_settings, self.device)[0]
            for eps, _ in minis[1:]
        ]

    def _update(self, minis, old_logp) -> dict[str, float]:  # noqa: ANN001
        """PPO epochs over the mini-batches; later epochs reuse the old and reference log-probs of the first."""
        a = self.cfg.algorithm
        records: list[dict[str, list[torch.Tensor | None]]] = [{} for _ in minis]
        per_mini: list[dict[str, float]] = []
        for epoch in range(a.ppo_epochs):
            for j, (eps, adv) in enumerate(minis):
                first = epoch == 0
                per_mini.append(
                    minibatch_update(
                        self.engine,
                        eps,
                        adv,
                        old_logp[j] if first else records[j]["old"],
                        None if first else records[j]["ref"],
                        self.update_settings,
                        self.device,
                        with_gap=first,
                        ref_model=self.ref_model if first else None,
                        record=records[j] if first and a.ppo_epochs > 1 else None,
                    )
                )
        # Each mini-batch's loss/* are its token-means; actor/* its micro-batch means: average over mini-batches.
        keys = sorted({k for m in per_mini for k in m})
        out = {k: sum(m[k] for m in per_mini if k in m) / sum(k in m for m in per_mini) for k in keys}
        out.setdefault("rollout/logprob_gap", 0.0)
        out.setdefault("optim/grad_norm", 0.0)
        return out

    def named_full_parameters(self):  # noqa: ANN201
        """(HF name, full tensor) pairs; under ZeRO-3 each parameter is gathered from its shards in turn."""
        import deepspeed

        for name, p in self.policy.named_parameters():
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield name, p.data.detach().clone()
            else:
                yield name, p.data.detach()

    def _sync_rollout_weights(self) -> None:
        self.rollout.sync_weights(self.named_full_parameters())

    # -- persistence ---------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "sampler": self.sampler.state.to_dict(),
            "mlflow_run_id": self.mlflow_run_id,
            "config_hash": config_hash(self.cfg),
            "resume_key": resume_key(self.cfg),
            "world_size": self.dist.world,
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.engine,
            self.ckpt_root,
            self.step,
            self.trainer_state(),
            rank=self.dist.rank,
            keep_last=self.cfg.checkpoint.keep_last,
            keep_every=self.cfg.checkpoint.select_every,  # candidates of checkpoint selection (select.py)
        )

    def export(self) -> Path | None:
        """HF-format safetensors export of the current policy (rank 0 writes; ZeRO-3 gathers first)."""
        out = self.run_dir / "hf_export"
        state_dict = None
        if self.cfg.deepspeed.zero_stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        if self.is_main:
            ckpt.export_hf(self.policy, self.model_path, out, state_dict=state_dict)
            # The prompts the policy was trained with (no paths: the export's digest must not depend on them).
            import yaml

            prompts = {k: self.cfg.model_dump(mode="json")[k] for k in ("rollout", "grounding")}
            (out / "mgpo_config.yaml").write_text(yaml.safe_dump(prompts, sort_keys=True))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return out if self.is_main else None

    def finish(self, last: dict[str, float]) -> dict[str, Any]:
        export = self.export() if self.cfg.checkpoint.export_hf else None
        manifest = {
            "status": "completed",
            "steps_done": self.step,
            "steps_run_this_process": getattr(self, "steps_run", 0),
            "total_steps": self.cfg.algorithm.total_steps,
            "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root)),
            "hf_export": str(export) if export else None,
            "mlflow_run_id": self.mlflow_run_id,
            "tracking_uri": redact(self.uri),  # a database URI's password never lands in a file
            "config_hash": config_hash(self.cfg),
            "world_size": self.dist.world,
            "final_metrics": last,
            "metrics_pending": bool(self.sink and not self.sink.flush()),
        }
        if self.is_main:
            ckpt._atomic_write_text(self.run_dir / "manifest.json", json.dumps(manifest, indent=1))
        return manifest
