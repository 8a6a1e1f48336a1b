"""A scripted rollout engine for tests of the engine-agnostic two-turn driver (replies are fixed texts)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mgpo_core.episodes import PromptTemplates
from mgpo_core.rollout import (
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    RolloutSettings,
    SamplingSpec,
)


class ScriptedEngine(RolloutEngine):
    """Replies with fixed texts: ``turn1[k]`` for the k-th turn-1 row, ``turn2`` for every turn-2 row."""

    name = "scripted"

    def __init__(self, bundle, cfg, turn1: list[str], turn2: str, *, end_turn1: bool = True) -> None:  # noqa: ANN001
        super().__init__(
            bundle.tokenizer,
            bundle.image_processor,
            bundle.special,
            PromptTemplates.from_config(cfg.rollout),
            RolloutSettings.from_config(cfg),
        )
        self.turn1, self.turn2, self.end_turn1 = turn1, turn2, end_turn1
        self.calls: list[list[GenerationRequest]] = []

    def _encode(self, text: str, end: bool) -> GenerationResult:
        ids = self.prompts.text_ids(text) + ([self.special.im_end] if end else [])
        return GenerationResult(ids, [-0.5] * len(ids), "stop" if end else "length")

    def _generate(self, requests: Sequence[GenerationRequest], spec: SamplingSpec, n: int):
        self.calls.append(list(requests))
        if len(self.calls) == 1:
            it = iter(self.turn1)
            return [[self._encode(next(it), self.end_turn1) for _ in range(n)] for _ in requests]
        return [[self._encode(self.turn2, True) for _ in range(n)] for _ in requests]

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        pass


def box_reply(x1: int, y1: int, x2: int, y2: int, tail: str = "") -> str:
    return f'The key area:\n```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "target"}}]\n```{tail}'
