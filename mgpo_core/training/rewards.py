"""Reward functions by name: an episode in, a float out. ``answer`` is the paper's binary answer reward."""

from __future__ import annotations

from collections.abc import Callable

from mgpo_core.episodes import Episode
from mgpo_core.reward import answer_reward, episode_answer_reward

RewardFn = Callable[[Episode], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward under ``name``; registering a taken name is an error."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name].__qualname__})")
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {sorted(REWARDS)}") from None


@register_reward("answer")
def answer(ep: Episode) -> float:
    """1.0 iff turn 2's last ``\\boxed{}`` is the right letter (METHOD.md §1.7; turn 1 is never scored).

    A single-turn episode (the GRPO baseline, ``ep.turns == 1``) is scored on its only turn.
    """
    if ep.turns == 1:
        return answer_reward(ep.turn1_text, ep.sample.answer)
    return episode_answer_reward(ep.turn2_text, ep.sample.answer, turn2_ran=ep.turn2_answered)
