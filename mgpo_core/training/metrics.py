"""Per-step rollout statistics under the namespaced keys users look for (DESIGN.md, "What to log every step")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mgpo_core.episodes import TURN1_TOKEN, TURN2_TOKEN, Episode
from mgpo_core.grounding import box_iou, map_box_to_original


def rollout_metrics(episodes: Sequence[Episode], advantages: torch.Tensor) -> dict[str, float]:
    """Reward, accuracy, grounding (valid-box ratio, reason shares, crop area, IoU), lengths, zero-advantage share."""
    n = len(episodes)
    if n == 0:
        return {}
    rewards = torch.tensor([ep.reward for ep in episodes], dtype=torch.float64)
    m: dict[str, float] = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if n > 1 else 0.0,
        "rollout/accuracy": float((rewards > 0.5).double().mean()),
        "rollout/valid_box_ratio": sum(ep.valid_box for ep in episodes) / n,
        "rollout/truncation_rate": sum(ep.truncated for ep in episodes) / n,
        "rollout/response_len_turn1": sum(ep.turn_length(TURN1_TOKEN) for ep in episodes) / n,
        "rollout/response_len_turn2": sum(ep.turn_length(TURN2_TOKEN) for ep in episodes) / n,
        "rollout/turn1_hit_max_rate": sum(ep.finish_reasons[0] == "length" for ep in episodes) / n,
    }
    reasons: dict[str, int] = {}
    for ep in episodes:
        reasons[ep.grounding.reason] = reasons.get(ep.grounding.reason, 0) + 1
    for reason, count in sorted(reasons.items()):
        m[f"rollout/box_reason/{reason}"] = count / n
    areas, ious = [], []
    for ep in episodes:
        if ep.crop_box is None:
            continue
        x1, y1, x2, y2 = ep.crop_box
        w, h = ep.original_size
        areas.append((x2 - x1) * (y2 - y1) / max(1, w * h))
        if ep.sample.gt_boxes:
            ious.append(max(box_iou(ep.crop_box, gt) for gt in ep.sample.gt_boxes))
    if areas:
        m["rollout/crop_area_frac"] = sum(areas) / len(areas)
    if ious:
        m["rollout/gt_iou"] = sum(ious) / len(ious)
    m.update({f"rollout/{k}": v for k, v in grounding_quality(episodes).items()})
    groups: dict[int, list[float]] = {}
    for ep, a in zip(episodes, advantages.tolist(), strict=True):
        groups.setdefault(ep.group, []).append(a)
    m["rollout/zero_adv_group_share"] = sum(all(abs(x) < 1e-12 for x in g) for g in groups.values()) / len(
        groups
    )
    return m


def box_in_original(ep: Episode) -> tuple[int, int, int, int] | None:
    """The episode's valid turn-1 box in ORIGINAL pixels (the crop box; for single-turn episodes, where nothing
    is cropped, the box mapped the same way), or None when the box was missing or invalid."""
    if ep.crop_box is not None:
        return ep.crop_box
    if not ep.grounding.valid or ep.grounding.box is None:
        return None
    return map_box_to_original(ep.grounding.box, ep.overview_size, ep.original_size)


def grounding_quality(episodes: Sequence[Episode]) -> dict[str, float]:
    """How well the model grounds, over the episodes whose sample has a ground-truth box.

    ``box_contains_target``: share of ALL those episodes whose valid box (in original pixels) holds the whole
    target box (a missing or invalid box counts as a miss) — the crop then shows what the question asks about;
    ``box_iou``: mean IoU of the valid boxes with the target. Empty when no sample has a ground-truth box.
    """
    hits, ious, n = 0, [], 0
    for ep in episodes:
        if not ep.sample.gt_boxes:
            continue
        n += 1
        box = box_in_original(ep)
        if box is None:
            continue
        x1, y1, x2, y2 = box
        if any(x1 <= g[0] and y1 <= g[1] and g[2] <= x2 and g[3] <= y2 for g in ep.sample.gt_boxes):
            hits += 1
        ious.append(max(box_iou(box, g) for g in ep.sample.gt_boxes))
    if n == 0:
        return {}
    out = {"box_contains_target": hits / n}
    if ious:
        out["box_iou"] = sum(ious) / len(ious)
    return out


def logprob_gap(episodes: Sequence[Episode], old_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |trainer log-prob − rollout-engine log-prob| over the tokens the engine sampled (stale-weight alarm)."""
    diffs = []
    for i, ep in enumerate(episodes):
        lp = ep.rollout_logprobs
        sel = torch.isfinite(lp) & (mask[i, : ep.length] > 0)
        diffs.append((old_logp[i, : ep.length][sel].float() - lp[sel]).abs())
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    return float(d.mean()) if d.numel() else 0.0
