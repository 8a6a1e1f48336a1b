"""Benchmark aggregations as pure functions: a list of per-question outcomes in, `{metric: fraction}` out.

Every score is a fraction in [0, 1] (not a percentage). Metric names are the part after `eval/<benchmark>/`;
label values become name parts through :func:`metric_key` ("Remote Sensing" -> "remote_sensing").

- V* (`vstar_scores`): `overall` = correct / all questions, plus one accuracy per category
  (`direct_attributes`, `relative_position`).
- HR-Bench (`hrbench_scores`): the questions are grouped by `cycle_category` (the option cycle); within each
  group the accuracy of `single`, of `cross` and of all questions is taken, and each is averaged over the
  groups (the published scoring). A category absent from a group (possible only in a `--limit` subsample)
  is averaged over the groups where it occurs; the published code divides by all groups, i.e. counts it as 0
  there. With complete data (every group holds both categories) the two agree.
- MME-RealWorld (`mme_realworld_scores`): `overall` = correct / all, `task/<task>` and
  `subtask/<task>/<subtask>` (subtask names repeat across tasks, so they are qualified by their task).
- Synthetic (`synthetic_scores`): `overall` plus per category (grounding metrics come from
  `grounding_metrics`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Outcome",
    "accuracy",
    "group_counts",
    "hrbench_scores",
    "metric_key",
    "mme_realworld_scores",
    "synthetic_scores",
    "vstar_scores",
]


@dataclass(frozen=True)
class Outcome:
    """One scored question: whether the prediction was right, and the labels the aggregation groups by.

    ``labels`` come from the benchmark spec's ``labels(sample)``: e.g. ``{"category": "single",
    "cycle_category": "2"}`` for HR-Bench or ``{"task": "Perception", "subtask": "OCR"}`` for MME-RealWorld.
    """

    correct: bool
    labels: Mapping[str, str] = field(default_factory=dict)
    id: str = ""


def metric_key(text: str) -> str:
    """A label as a metric-name part: lower case, runs of anything but ``[a-z0-9]`` become one ``_``."""
    key = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return key or "unknown"


def _mean(values: Iterable[bool | float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals)


def _require(outcomes: Sequence[Outcome], benchmark: str) -> None:
    if not outcomes:
        raise ValueError(f"{benchmark}: no outcomes to score; the evaluation produced no answered questions")


def _label(outcome: Outcome, key: str, benchmark: str) -> str:
    value = outcome.labels.get(key)
    if value is None or value == "":
        raise ValueError(
            f"{benchmark}: question {outcome.id!r} has no {key!r} label (labels: {dict(outcome.labels)}); "
            f"the benchmark's reader must fill it in (see mgpo_core/evaluation/benchmarks.py)"
        )
    return str(value)


def _by(outcomes: Sequence[Outcome], key: str, benchmark: str) -> dict[str, list[Outcome]]:
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[_label(o, key, benchmark)].append(o)
    return dict(groups)


def accuracy(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """``{"overall": correct / total}``."""
    _require(outcomes, "accuracy")
    return {"overall": _mean(o.correct for o in outcomes)}


def _per_label(outcomes: Sequence[Outcome], key: str, benchmark: str, prefix: str = "") -> dict[str, float]:
    return {
        prefix + metric_key(name): _mean(o.correct for o in group)
        for name, group in sorted(_by(outcomes, key, benchmark).items())
    }


def vstar_scores(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """``overall`` (correct / all) and the accuracy of each ``category`` label."""
    _require(outcomes, "vstar")
    return {**accuracy(outcomes), **_per_label(outcomes, "category", "vstar")}


def hrbench_scores(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """Mean over ``cycle_category`` groups of the per-group accuracy: ``single``, ``cross`` and ``overall``.

    Also ``cycle/<group>`` (the all-question accuracy of each cycle group), useful to spot an option-position
    bias: a model that prefers one letter scores very differently across cycles.
    """
    _require(outcomes, "hrbench")
    per_cat: dict[str, list[float]] = defaultdict(list)
    overall: list[float] = []
    cycles: dict[str, float] = {}
    for cycle, group in sorted(_by(outcomes, "cycle_category", "hrbench").items()):
        acc = _mean(o.correct for o in group)
        overall.append(acc)
        cycles[f"cycle/{metric_key(cycle)}"] = acc
        for cat, members in _by(group, "category", "hrbench").items():
            per_cat[metric_key(cat)].append(_mean(o.correct for o in members))
    scores = {"overall": _mean(overall)}
    scores.update({cat: _mean(accs) for cat, accs in sorted(per_cat.items())})
    scores.update(cycles)
    return scores


def mme_realworld_scores(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """``overall`` (correct / all), ``task/<task>`` and ``subtask/<task>/<subtask>`` accuracies."""
    _require(outcomes, "mme_realworld")
    scores = accuracy(outcomes)
    for task, group in sorted(_by(outcomes, "task", "mme_realworld").items()):
        scores[f"task/{metric_key(task)}"] = _mean(o.correct for o in group)
        scores.update(_per_label(group, "subtask", "mme_realworld", prefix=f"subtask/{metric_key(task)}/"))
    return scores


def synthetic_scores(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """``overall`` plus ``category/<c>`` when the synthetic questions carry a category label."""
    _require(outcomes, "synthetic")
    scores = accuracy(outcomes)
    if all(o.labels.get("category") for o in outcomes):
        scores.update(_per_label(outcomes, "category", "synthetic", prefix="category/"))
    return scores


def group_counts(outcomes: Sequence[Outcome]) -> dict[str, dict[str, int]]:
    """``{label key: {label value: count}}`` for the summary JSON: how many questions each score rests on."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for o in outcomes:
        for key, value in o.labels.items():
            counts[key][str(value)] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(counts.items())}
