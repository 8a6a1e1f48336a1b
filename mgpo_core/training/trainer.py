"""The MGPO training loop on DeepSpeed, readable top to bottom (one RL step = rollout → advantages → PPO update).

Per step: draw prompts → two-turn rollouts (n per prompt) → rewards → GRPO advantages → old log-probs (recomputed)
and reference log-probs (frozen initial model; skipped when ``kl_coef`` is 0) → PPO updates over mini-batches with
micro-batch gradient accumulation → push weights to the rollout engine → metrics → checkpoint every k steps.
Works as one plain process or as a rank of a ``deepspeed``/``torchrun`` process group (``RANK``/``WORLD_SIZE``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mgpo_core.algorithms import LossCoefficients, grpo_advantages, mgpo_loss
from mgpo_core.config import MGPOConfig, config_hash, flatten_config, save_config
from mgpo_core.data.schema import Sample
from mgpo_core.episodes import Episode, PromptTemplates, train_mask
from mgpo_core.logprobs import collate_episodes, token_logprobs
from mgpo_core.modeling.loading import load_bundle, load_model, model_dir_for
from mgpo_core.rollout import ENGINES, RolloutEngine, RolloutSettings, resolve_engine_name
from mgpo_core.training import checkpoint as ckpt
from mgpo_core.training.collapse import CollapseMonitor
from mgpo_core.training.ds_config import build_ds_config
from mgpo_core.training.metrics import rollout_metrics
from mgpo_core.training.rewards import get_reward
from mgpo_core.training.sampler import PromptSampler, SamplerState, shard_for_rank
from mgpo_core.training.tracking import MetricsSink, ensure_run, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int


def init_distributed() -> DistInfo:
    """Join the launcher's process group, or make a one-process group for plain ``python``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    )


def rank0_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 first (it may build or download-free prepare shared files), then on the others."""
    dist = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if dist and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return fn()
    out = fn()
    if dist:
        torch.distributed.barrier()
    return out


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


def _all_reduce_sum(x: float, device: torch.device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return float(t.item())


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


@dataclass(frozen=True)
class UpdateSettings:
    """What one PPO update needs besides the tensors: loss weights, micro-batch size and how log-probs are taken."""

    coefs: LossCoefficients
    micro_batch_size: int
    pad_id: int
    temperature: float = 1.0
    """The rollout's sampling temperature: every log-prob of the update is of softmax(logits / T)."""
    suppress_ids: tuple[int, ...] = ()
    """Ids the rollout engines never sample (vision placeholders, padded rows): excluded from the distribution."""
    train_forced: bool = False
    """Whether tokens the environment forced (no behaviour log-prob) enter the loss."""
    bucket_by_length: bool = True
    """Sort each mini-batch share by length before cutting it into micro-batches (:func:`micro_batch_order`)."""
    share_prompt: bool = False
    """Run each prompt that episodes of a micro-batch share once (:mod:`mgpo_core.packing`); micro-batches then
    keep a prompt's episodes together (:func:`micro_batch_order`)."""

    @classmethod
    def from_config(cls, cfg: MGPOConfig, special) -> UpdateSettings:  # noqa: ANN001 - SpecialTokens
        a = cfg.algorithm
        return cls(
            coefs=LossCoefficients.from_algorithm(a),
            micro_batch_size=a.micro_batch_size,
            pad_id=special.pad,
            temperature=cfg.rollout.temperature,
            suppress_ids=tuple(special.non_text_ids()),
            train_forced=a.train_forced_tokens,
            share_prompt=a.shared_prompt,
        )

    def collate(self, episodes: Sequence[Episode], model, device: torch.device, dtype: torch.dtype):  # noqa: ANN001, ANN201
        return collate_episodes(
            episodes, model, self.pad_id, train_forced=self.train_forced, share_prompt=self.share_prompt
        ).to(device, dtype)

    def logprobs(self, model, batch, *, with_entropy: bool = False):  # noqa: ANN001, ANN201
        return token_logprobs(
            model,
            batch,
            with_entropy=with_entropy,
            temperature=self.temperature,
            suppress_ids=self.suppress_ids,
        )


def engine_logprobs(engine, batch, settings: UpdateSettings, *, with_entropy: bool):  # noqa: ANN001, ANN201
    """The policy's log-probs of ``batch`` computed as ONE forward of the DeepSpeed engine (``engine(...)``).

    DeepSpeed's micro-step contract is ``engine(...)`` → ``engine.backward(loss)`` → ``engine.step()``: its
    forward starts the ZeRO optimiser's micro-step (ZeRO-3 advances ``micro_step_id``, so the next backward
    ADDS to the gradient partitions instead of overwriting them; ZeRO-1/2 clear the previous micro-step's
    accumulation state) and registers the output hooks that run the backward prologue (gradient-accumulation
    boundary flag, ZeRO's backward entry). Calling the module directly skips all of it: under ZeRO-3 every
    micro-batch's gradient then replaced the previous one's. The engine's forward calls ``engine.module(...)``,
    so for this one call the module's forward is our log-prob function (an instance attribute shadowing the
    class's ``forward``; removed again right after).
    """
    module = engine.module

    def forward(b):  # noqa: ANN001, ANN202
        return settings.logprobs(module, b, with_entropy=with_entropy)

    module.forward = forward
    try:
        return engine(batch)
    finally:
        del module.forward


def micro_batch_order(episodes: Sequence[Episode], settings: UpdateSettings) -> list[int]:
    """The order in which one rank's share of a mini-batch is cut into micro-batches of ``micro_batch_size``.

    Longest first (stable), so each micro-batch holds episodes of similar length and a short episode is not padded
    to the longest one of the share (and the first micro-batch already reaches the peak memory). With
    ``settings.share_prompt`` the unit is a prompt's group instead of an episode (groups by their packed length,
    longest first; inside a group longest first), so a micro-batch runs each prompt once for all its rollouts.
    Exact: every micro-batch's loss is a sum over its tokens divided by the WHOLE mini-batch's normaliser, so the
    accumulated gradient does not depend on how the episodes are grouped (only the float summation order changes).
    ``settings.bucket_by_length=False`` keeps the rollout order.
    """
    idx = list(range(len(episodes)))
    if not settings.bucket_by_length:
        return idx
    if not settings.share_prompt:
        return sorted(idx, key=lambda i: -episodes[i].length)
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(episodes[i].group, []).append(i)
    members = [sorted(g, key=lambda i: -episodes[i].length) for g in groups.values()]

    def packed_length(g: list[int]) -> int:
        p = min(episodes[i].prompt_len for i in g)
        return p + sum(episodes[i].length - p for i in g)

    members.sort(key=lambda g: -packed_length(g))
    return [i for g in members for i in g]


def forward_tokens(minis: Sequence[tuple[Sequence[Episode], Any]], settings: UpdateSettings) -> int:
    """Tokens one forward over the step's micro-batches runs: with ``settings.share_prompt`` each micro-batch runs
    the prompt its episodes share once (:func:`mgpo_core.packing.packed_tokens`), else every episode token."""
    from mgpo_core.packing import packed_tokens

    mb, total = settings.micro_batch_size, 0
    for eps, _ in minis:
        for k in range(0, len(eps), mb):
            chunk = eps[k : k + mb]
            total += packed_tokens(chunk) if settings.share_prompt else sum(ep.length for ep in chunk)
    return total


def _gap_sums(episodes: Sequence[Episode], logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum and count of |trainer log-prob − rollout log-prob| over the sampled loss tokens of a micro-batch."""
    total, count = 0.0, 0
    for i, ep in enumerate(episodes):
        lp = ep.rollout_logprobs
        sel = torch.isfinite(lp) & (mask[i, : ep.length] > 0)
        total += float((logp[i, : ep.length][sel].float() - lp[sel]).abs().sum())
        count += int(sel.sum())
    return total, count


def minibatch_update(
    engine,  # noqa: ANN001
    episodes: Sequence[Episode],
    adv: torch.Tensor,
    old_logp: Sequence[torch.Tensor | None] | None,
    ref_logp: Sequence[torch.Tensor | None] | None,
    settings: UpdateSettings,
    device: torch.device,
    *,
    with_gap: bool = False,
    ref_model: torch.nn.Module | None = None,
    record: dict[str, list[torch.Tensor | None]] | None = None,
) -> dict[str, float]:
    """One optimiser step over one rank's share of a mini-batch, accumulated over its micro-batches.

    ``old_logp``/``ref_logp`` hold one tensor per micro-batch of ``episodes`` (chunks of ``micro_batch_size``, in
    the given order).

    *On-policy* (``old_logp`` None, or an entry None): the policy has not been updated since the rollout (the
    first mini-batch of an RL step's first PPO epoch), so the old log-probs ARE this forward's log-probs,
    detached: the ratio is exactly 1, the clip inactive, the gradient the plain policy gradient, and no separate
    old-log-prob pass is needed. *Fused reference*: with ``ref_logp`` None (or an entry None) and a ``ref_model``,
    the reference log-probs are computed here, on the same collated micro-batch (no grad), just before the
    policy's forward; its activations are freed before the policy's, so the peak memory is the update's.
    ``record`` (a dict) receives the old and reference log-probs used, one tensor per micro-batch (for later PPO
    epochs over the same mini-batch).
    Every micro-batch's loss is divided by the mini-batch's loss-token count over all ranks divided by the world
    size; DeepSpeed averages gradients over ranks and does not rescale by the accumulation steps
    (``scale_wrt_gas=False``), so the accumulated gradient is that of the token-mean over the whole mini-batch,
    and the clipping and the grad norm DeepSpeed applies at the boundary are the whole mini-batch's.

    Returns the mini-batch's ``loss/*`` (summed over micro-batches), the mean ``actor/*`` over micro-batches,
    ``optim/grad_norm`` (before clipping) and, with ``with_gap``, ``rollout/logprob_gap``.
    """
    mb = settings.micro_batch_size
    chunks = [episodes[i : i + mb] for i in range(0, len(episodes), mb)]
    gas = engine.gradient_accumulation_steps()
    if len(chunks) != gas or (old_logp is not None and len(old_logp) != gas):
        raise RuntimeError(
            f"a mini-batch share of {len(episodes)} episodes makes {len(chunks)} micro-batches of {mb}, but the "
            f"DeepSpeed engine accumulates {gas}: the optimiser step would not cover exactly one mini-batch"
        )
    if engine.micro_steps % gas:
        raise RuntimeError(
            f"DeepSpeed is {engine.micro_steps % gas} micro-steps into an accumulation window at the start of a "
            "mini-batch; every engine(...)/backward/step must belong to a whole mini-batch"
        )
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    dtype = next(engine.module.parameters()).dtype
    masks = [train_mask(ep, settings.train_forced) for ep in episodes]
    local_tokens = float(sum(float(m.sum()) for m in masks))
    normalizer = max(_all_reduce_sum(local_tokens, device) / world, 1.0)
    with_entropy = settings.coefs.entropy_coef > 0
    sums: dict[str, float] = {}
    gap_sum, gap_count = 0.0, 0
    steps_before = engine.global_steps
    for k, chunk in enumerate(chunks):
        batch = settings.collate(chunk, engine.module, device, dtype)
        ref_k = None if ref_logp is None else ref_logp[k]
        if ref_k is None and ref_model is not None:
            with torch.no_grad():
                ref_k = settings.logprobs(ref_model, batch)[0].float()
        logp, ent = engine_logprobs(engine, batch, settings, with_entropy=with_entropy)
        logp = logp.float()
        old_k = None if old_logp is None else old_logp[k]
        old_k = logp.detach() if old_k is None else old_k.to(device)
        if record is not None:
            record.setdefault("old", []).append(old_k)
            record.setdefault("ref", []).append(ref_k)
        start = k * mb
        loss, metrics = mgpo_loss(
            logp,
            old_k,
            None if ref_k is None else ref_k.to(device),
            adv[start : start + len(chunk)].to(device),
            batch.loss_mask,
            ent,
            settings.coefs,
            normalizer=normalizer,
        )
        if k == gas - 1 and not engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "the last micro-batch of a mini-batch is not DeepSpeed's accumulation boundary"
            )
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        if with_gap:
            g_sum, g_count = _gap_sums(chunk, old_k.cpu(), batch.loss_mask.cpu())
            gap_sum, gap_count = gap_sum + g_sum, gap_count + g_count
        for key, v in metrics.items():
            sums[key] = sums.get(key, 0.0) + v
    if engine.global_steps != steps_before + 1:
        raise RuntimeError(
            f"DeepSpeed took {engine.global_steps - steps_before} optimiser steps for one mini-batch (expected 1)"
        )
    out = {k: (v if k.startswith("loss/") else v / len(chunks)) for k, v in sums.items()}
    gn = engine.get_global_grad_norm()
    if gn is not None:
        out["optim/grad_norm"] = float(gn)
    if with_gap:  # token-mean over the share's sampled loss tokens (independent of the micro-batch grouping)
        out["rollout/logprob_gap"] = gap_sum / gap_count if gap_count else 0.0
    return out


@torch.no_grad()
def reference_logprobs(
    policy, ref_model, episodes: Sequence[Episode], settings: UpdateSettings, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Old (``policy`` before the update) and reference log-probs, one tensor per micro-batch, same distribution
    (temperature, suppressed ids) as the update's."""
    mb = settings.micro_batch_size
    dtype = next(policy.parameters()).dtype
    old, ref = [], []
    was_training = policy.training
    policy.eval()
    try:
        for i in range(0, len(episodes), mb):
            batch = settings.collate(episodes[i : i + mb], policy, device, dtype)
            old.append(settings.logprobs(policy, batch)[0].float())
            ref.append(settings.logprobs(ref_model, batch)[0].float() if ref_model is not None else None)
    finally:
        policy.train(was_training)
    return old, ref


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
            save_config(cfg, self.run_dir / "config.yaml")

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
        if cfg.algorithm.kl_coef > 0:  # the frozen INITIAL policy, also after a resume
            self.ref_model = load_model(self.model_path, dtype=cfg.model.dtype, device=str(self.device))
            self.ref_model.requires_grad_(False).eval()

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
        self._val_samples: list | None = None
        self.mlflow_run_id = mlflow_run_id or cfg.tracking.run_id
        self.uri = resolve_tracking_uri(cfg.tracking.mlflow_tracking_uri, cfg.state_dir)
        self._resume()
        if self.step > 0 and getattr(self.rollout, "model", None) is not self.policy:
            self._sync_rollout_weights()  # a separate engine starts from the base weights: push the resumed ones
        self.sink: MetricsSink | None = None
        self.collapse = CollapseMonitor.from_journal(self.run_dir / "metrics.jsonl", self.step)
        if self.is_main:
            self.mlflow_run_id = self._attach_run()
            self.sink = MetricsSink(self.uri, self.mlflow_run_id, self.run_dir)

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

                params = [Param(k, v[:6000]) for k, v in flatten_config(self.cfg).items()]
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
            from mgpo_core.training.entry import load_eval_samples

            self._val_samples = load_eval_samples(self.cfg)[: self.cfg.evaluation.during_training_limit]
        t = time.perf_counter()
        self.rollout.wake()
        episodes = rollout_episodes(self.rollout, self.cfg, self._val_samples, seed=0, greedy=True, n=1)
        self.rollout.sleep()
        n = max(1, len(episodes))
        m = {
            "val/accuracy": sum(ep.reward > 0.5 for ep in episodes) / n,
            "val/valid_box_ratio": sum(ep.valid_box for ep in episodes) / n,
            **{f"val/{k}": v for k, v in grounding_quality(episodes).items()},
            "timing/validation_s": time.perf_counter() - t,
        }
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
            "tracking_uri": self.uri,
            "config_hash": config_hash(self.cfg),
            "world_size": self.dist.world,
            "final_metrics": last,
            "metrics_pending": bool(self.sink and not self.sink.flush()),
        }
        if self.is_main:
            ckpt._atomic_write_text(self.run_dir / "manifest.json", json.dumps(manifest, indent=1))
        return manifest
