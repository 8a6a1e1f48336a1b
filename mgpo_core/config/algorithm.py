"""`AlgorithmConfig`: GRPO advantages, the clipped KL-regularised loss and the RL batch sizes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mgpo_core.config.base import PositiveInt, UnitFloat, _Section
from mgpo_core.config.errors import _FieldProblem


class AlgorithmConfig(_Section):
    """GRPO advantages and the clipped, KL-regularised policy loss with the multi-turn mask (METHOD.md §2)."""

    advantage: Literal["grpo"] = "grpo"
    """Advantage estimator: group-normalised reward, one scalar per trajectory."""
    adv_eps: float = Field(1e-6, gt=0.0)
    """Added to the group's unbiased std before dividing."""
    clip_low: UnitFloat = 0.2
    """PPO ratio clip below 1 (ratio >= 1 - clip_low)."""
    clip_high: float = Field(0.2, gt=0.0)
    """PPO ratio clip above 1 (ratio <= 1 + clip_high)."""
    kl_coef: float = Field(0.01, ge=0.0)
    """Weight of the KL loss term against the frozen initial model; 0 disables the reference model."""
    kl_estimator: Literal["k1", "k2", "low_var_kl"] = "low_var_kl"
    """Per-token KL estimator; low_var_kl is k3, exp(ref - logp) - (ref - logp) - 1."""
    kl_clamp: float = Field(10.0, gt=0.0)
    """The per-token KL estimate is clamped to [-kl_clamp, kl_clamp]."""
    entropy_coef: float = Field(0.001, ge=0.0)
    """Weight of the entropy bonus."""
    loss_turns: Literal["all", "final"] = "all"
    """Which assistant turns enter the loss: `all` (MGPO's multi-turn mask: both turns' generated tokens) or
    `final` (ablation: only the answer turn; turn 1's box is context, never trained)."""
    train_forced_tokens: bool = False
    """Train on tokens the environment forced into an assistant turn (turn 1's `<|im_end|>` appended after the cut
    JSON block or at the length cap). False: they stay in the context but enter no loss term (they were never
    sampled, so they have no behaviour log-prob); True: trained like sampled tokens, as the reference does."""
    shared_prompt: bool = True
    """Run the prompt the n rollouts of a prompt share (system prompt, overview image, turn-1 question) once per
    micro-batch instead of n times (`mgpo_core.packing`): same log-probs and gradients, less work. Keep a prompt's
    rollouts in one micro-batch (`micro_batch_size` a multiple of `rollout.n`) to share it n ways. Needs a registered
    attention implementation (`model.attn_implementation` sdpa or flash_attention_2, not eager)."""
    ppo_epochs: PositiveInt = 1
    """Passes over each RL step's trajectories."""
    prompts_per_step: PositiveInt = 512
    """Prompts per RL step (each rolled out `rollout.n` times)."""
    mini_batch_prompts: PositiveInt = 128
    """Prompts per optimiser step; must divide `prompts_per_step`."""
    micro_batch_size: PositiveInt = 8
    """Trajectories per forward/backward pass (gradient accumulation inside a mini-batch)."""
    total_steps: PositiveInt = 80
    """RL steps in a training run."""
    seed: int = 0
    """Seed of sampling, init and everything else random in training."""
    reward: str = "answer"
    """Reward function by name (`mgpo_core.training.rewards`): `answer` is the paper's binary answer reward."""

    @model_validator(mode="after")
    def _mini_batch_divides_step(self) -> AlgorithmConfig:
        total, mini = self.prompts_per_step, self.mini_batch_prompts
        if total % mini:
            divisors = [d for d in range(1, total + 1) if total % d == 0]
            nearest = sorted(sorted(divisors, key=lambda d: abs(d - mini))[:6])
            raise _FieldProblem(
                f"must divide algorithm.prompts_per_step={total} so each RL step is whole optimiser steps",
                mini, f"use one of {nearest} or change algorithm.prompts_per_step", field="mini_batch_prompts",
            )
        return self
