"""Deterministic prompt order with a resumable position: epoch-wise seeded permutations, groups kept whole.

The position is two integers (epoch, index) saved in every checkpoint, so a resumed run draws exactly the prompts
the uninterrupted run would have drawn — including across an epoch boundary.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class SamplerState:
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class PromptSampler(Generic[T]):
    """Draw batches of prompts without replacement within an epoch; a new seeded permutation each epoch."""

    def __init__(self, items: Sequence[T], seed: int, state: SamplerState | None = None) -> None:
        if not items:
            raise ValueError("the training set is empty: check data.train_path or the filter report")
        self.items = list(items)
        self.seed = seed
        self.state = state or SamplerState()

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, k: int) -> list[T]:
        """The next ``k`` prompts (crossing into the next epoch when this one runs out)."""
        out: list[T] = []
        order = self._order(self.state.epoch)
        while len(out) < k:
            if self.state.index >= len(order):
                self.state = SamplerState(self.state.epoch + 1, 0)
                order = self._order(self.state.epoch)
            take = min(k - len(out), len(order) - self.state.index)
            out.extend(self.items[i] for i in order[self.state.index : self.state.index + take])
            self.state.index += take
        return out


def shard_for_rank(batch: Sequence[T], rank: int, world: int) -> list[T]:
    """Contiguous slice of the global prompt batch for one rank; every prompt's n rollouts stay on that rank,
    so each GRPO group is whole where its advantage is computed."""
    if len(batch) % world:
        raise ValueError(
            f"algorithm.prompts_per_step={len(batch)} is not divisible by the world size {world}; "
            "choose a multiple of the number of ranks"
        )
    per = len(batch) // world
    return list(batch[rank * per : (rank + 1) * per])
