"""Per-token log-probs and entropies of a batch of episodes under a model, with 3-D M-RoPE over both images.

Position ids are computed over the WHOLE two-image sequence with the model's own ``get_rope_index`` (the
reference falls back to 1-D positions in training while its rollout engine uses M-RoPE; we do not). The LM head
is applied in chunks of the sequence so the full (B, L, V) float32 logits of a real 150k vocabulary never exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mgpo_core import algorithms
from mgpo_core.episodes import Episode


@dataclass
class EpisodeBatch:
    """Right-padded tensors of a list of episodes.

    Shapes: ``input_ids``, ``attention_mask``, ``loss_mask``, ``mm_token_type_ids`` (B, L); ``position_ids``
    (3, B, L); ``pixel_values`` (ΣN, D) for all images of all episodes in order; ``image_grid_thw`` (n_images, 3).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EpisodeBatch:
        pv = self.pixel_values
        if pv is not None:
            pv = pv.to(device, dtype) if dtype is not None else pv.to(device)
        return EpisodeBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
            self.mm_token_type_ids.to(device),
            self.position_ids.to(device),
            pv,
            None if self.image_grid_thw is None else self.image_grid_thw.to(device),
        )


def _rope_owner(model):
    """The submodule that owns ``get_rope_index`` (``model.model`` for ``*ForConditionalGeneration``)."""
    for cand in (
        model,
        getattr(model, "model", None),
        getattr(getattr(model, "module", None), "model", None),
    ):
        if cand is not None and hasattr(cand, "get_rope_index"):
            return cand
    raise TypeError(f"{type(model).__name__} has no get_rope_index: not a Qwen2-VL-family model")


def collate_episodes(episodes: Sequence[Episode], model, pad_id: int) -> EpisodeBatch:
    """Pad episodes to one batch and compute their M-RoPE position ids with the model's own code."""
    if not episodes:
        raise ValueError("collate_episodes: empty list of episodes")
    width = max(ep.length for ep in episodes)
    b = len(episodes)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.float32)
    mm = torch.zeros((b, width), dtype=torch.int32)
    for i, ep in enumerate(episodes):
        n = ep.length
        ids[i, :n], attn[i, :n], mask[i, :n], mm[i, :n] = ep.input_ids, 1, ep.loss_mask, ep.mm_token_type_ids
    grids = [ep.image_grid_thw for ep in episodes if ep.image_grid_thw.numel()]
    pixels = [ep.pixel_values for ep in episodes if ep.pixel_values.numel()]
    grid = torch.cat(grids) if grids else None
    pv = torch.cat(pixels) if pixels else None
    with torch.no_grad():
        pos, _ = _rope_owner(model).get_rope_index(
            ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=attn
        )
    return EpisodeBatch(ids, attn, mask, mm, pos, pv, grid)


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each token given its prefix, aligned to the token: out[b, t] = log p(ids[b,t] | ids[b,<t]).

    ``logits`` (B, L, V) are the model's outputs at positions 0..L-1; out[:, 0] is 0 (no prefix).
    """
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = torch.gather(lp, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(tok, (1, 0))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each next-token distribution, aligned like ``logprobs_from_logits``: (B, L)."""
    return torch.nn.functional.pad(algorithms.entropy_from_logits(logits[:, :-1]), (1, 0))


def forward_hidden(model, batch: EpisodeBatch) -> torch.Tensor:
    """Last hidden states (B, L, H) of the language model for a collated batch."""
    inner = model.model if hasattr(model, "lm_head") else model.module.model
    out = inner(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        mm_token_type_ids=batch.mm_token_type_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def token_logprobs(
    model, batch: EpisodeBatch, *, with_entropy: bool = False, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked per-token log-probs (B, L) and optionally entropies (B, L) of ``batch`` under ``model``.

    Values at positions where ``loss_mask`` is 0 are set to 0. Differentiable (call under ``torch.no_grad``
    for old/reference log-probs). Equal, row by row, to calling it one episode at a time.
    """
    head = model.lm_head if hasattr(model, "lm_head") else model.module.lm_head
    hidden = forward_hidden(model, batch)
    b, length, _ = hidden.shape
    lps, ents = [], []
    # Position t's logits predict token t+1: chunk with one position of overlap.
    for start in range(0, length - 1, chunk_size):
        stop = min(start + chunk_size + 1, length)
        logits = head(hidden[:, start:stop])
        lps.append(logprobs_from_logits(logits, batch.input_ids[:, start:stop])[:, 1:])
        if with_entropy:
            ents.append(entropy_from_logits(logits)[:, 1:])
    zero = hidden.new_zeros((b, 1), dtype=torch.float32)
    logp = torch.cat([zero, *lps], dim=1) * batch.loss_mask
    ent = torch.cat([zero, *ents], dim=1) * batch.loss_mask if with_entropy else None
    return logp, ent
