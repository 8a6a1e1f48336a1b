"""Per-token log-probs and entropies of a batch of episodes under a model, with 3-D M-RoPE over both images.

Position ids are computed over the WHOLE two-image sequence with the model's own ``get_rope_index`` (the
reference falls back to 1-D positions in training while its rollout engine uses M-RoPE; we do not). The LM head
and the log-softmax run only at the loss positions, in checkpointed chunks, so neither the (B, L, V) logits of a
real 152k vocabulary nor the (N_loss, V) ones are ever kept for the backward (METHOD.md §2b).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mgpo_core import algorithms
from mgpo_core.episodes import Episode, train_mask
from mgpo_core.packing import PackedRows, SharedPromptMask, pack_batch
from mgpo_core.packing import install as install_shared_prompt_attention


@dataclass
class EpisodeBatch:
    """Right-padded tensors of a list of episodes.

    Shapes: ``input_ids``, ``attention_mask``, ``loss_mask``, ``mm_token_type_ids`` (B, L); ``position_ids``
    (3, B, L); ``pixel_values`` (ΣN, D) for all images of all episodes in order; ``image_grid_thw`` (n_images, 3).
    ``packed``: the same episodes with each shared prompt once (:mod:`mgpo_core.packing`), which is what the model
    then runs; everything the loss reads stays in the (B, L) episode layout above.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    packed: PackedRows | None = None

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
            None if self.packed is None else self.packed.to(device, dtype),
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


def collate_episodes(
    episodes: Sequence[Episode],
    model,
    pad_id: int,
    *,
    train_forced: bool = True,
    share_prompt: bool = False,
) -> EpisodeBatch:
    """Pad episodes to one batch and compute their M-RoPE position ids with the model's own code.

    ``loss_mask`` is each episode's :func:`~mgpo_core.episodes.train_mask`: with ``train_forced=False`` the tokens
    the environment forced (turn 1's appended ``<|im_end|>``) are context, not loss tokens. With ``share_prompt``
    the batch also carries its packed form (each prompt the episodes share run once, :mod:`mgpo_core.packing`)
    when at least two episodes share one.
    """
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
        ids[i, :n], attn[i, :n], mm[i, :n] = ep.input_ids, 1, ep.mm_token_type_ids
        mask[i, :n] = train_mask(ep, train_forced)
    grids = [ep.image_grid_thw for ep in episodes if ep.image_grid_thw.numel()]
    pixels = [ep.pixel_values for ep in episodes if ep.pixel_values.numel()]
    grid = torch.cat(grids) if grids else None
    pv = torch.cat(pixels) if pixels else None
    with torch.no_grad():
        pos, _ = _rope_owner(model).get_rope_index(
            ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=attn
        )
    packed = pack_batch(episodes, pos, pad_id, width) if share_prompt else None
    return EpisodeBatch(ids, attn, mask, mm, pos, pv, grid, packed)


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


def distinct_images(pixel_values: torch.Tensor, grid: torch.Tensor) -> tuple[list[int], list[int]]:
    """``(first, where)``: the index of the first copy of each distinct image, and for every image of the batch the
    position in ``first`` of its copy. Images are equal when their grid and every pixel-patch value are equal.

    The n rollouts of a prompt share its overview, and turn 2 repeats the overview when turn 1 gave no valid box:
    a micro-batch often holds the same image many times.
    """
    sizes = grid.prod(-1).tolist()
    slices = torch.split(pixel_values, sizes)
    first: list[int] = []
    where: list[int] = []
    by_grid: dict[tuple[int, ...], list[int]] = {}
    for i, (pix, g) in enumerate(zip(slices, grid.tolist(), strict=True)):
        cands = by_grid.setdefault(tuple(g), [])
        for u in cands:
            if torch.equal(slices[first[u]], pix):
                where.append(u)
                break
        else:
            cands.append(len(first))
            where.append(len(first))
            first.append(i)
    return first, where


def _image_features_once(inner, pixel_values: torch.Tensor, grid: torch.Tensor):  # noqa: ANN001, ANN202
    """The vision tower's output for every image of the batch, computed ONCE per distinct image (``None`` when all
    images differ). The vision tower attends within each image only (per-image ``cu_seqlens``), so an image's
    features do not depend on the others in the batch; a repeated image's features are the same tensor, and the
    backward adds the gradients of all its copies, as the separate computations would (up to float order)."""
    first, where = distinct_images(pixel_values, grid)
    if len(first) == len(where):
        return None
    slices = torch.split(pixel_values, grid.prod(-1).tolist())
    out = inner.get_image_features(torch.cat([slices[i] for i in first]), grid[first], return_dict=True)
    feats = out.pooler_output
    out.pooler_output = tuple(feats[u] for u in where)
    return out


def _packed_attention(inner, packed: PackedRows) -> dict[str, SharedPromptMask]:  # noqa: ANN001
    """The packed rows' attention layout, in the slot transformers passes unchanged to every layer's attention (a
    prepared mask per layer type); :func:`mgpo_core.packing.install` routes it to the shared-prompt attention."""
    config = inner.language_model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(
            f"shared-prompt packing supports full attention in every layer; this model has {sorted(layer_types)}: "
            "set algorithm.shared_prompt=false"
        )
    if config._attn_implementation == "eager":
        raise ValueError(
            "shared-prompt packing runs through transformers' registered attention functions, and 'eager' is not "
            "one: set model.attn_implementation=sdpa (or algorithm.shared_prompt=false)"
        )
    install_shared_prompt_attention()
    return {"full_attention": packed.layout}


def forward_hidden(model, batch: EpisodeBatch, *, dedupe_images: bool = True) -> torch.Tensor:
    """Last hidden states of the language model for a collated batch: (B, L, H), or (R, Lp, H) in the packed
    layout when ``batch.packed`` is set (map episode tokens with ``packed.row``/``packed.col``).

    With ``dedupe_images`` the vision tower runs once per distinct image of the batch (:func:`distinct_images`).
    """
    inner = model.model if hasattr(model, "lm_head") else model.module.model
    src = batch.packed if batch.packed is not None else batch
    pixel_values, grid, encoded = src.pixel_values, src.image_grid_thw, None
    if dedupe_images and pixel_values is not None and grid is not None:
        encoded = _image_features_once(inner, pixel_values, grid)
    attention = batch.attention_mask if batch.packed is None else _packed_attention(inner, batch.packed)
    out = inner(
        input_ids=src.input_ids,
        attention_mask=attention,
        position_ids=src.position_ids,
        pixel_values=None if encoded is not None else pixel_values,
        image_grid_thw=grid,
        mm_token_type_ids=src.mm_token_type_ids,
        use_cache=False,
        **({"mm_encoder_outputs": {"image": encoded}} if encoded is not None else {}),
    )
    return out.last_hidden_state


def loss_positions(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of every position t ≥ 1 with ``loss_mask[b, t] != 0``: the tokens the loss needs a value for.

    Position 0 has no prefix and never carries a loss; the prediction of token t is read at position t − 1.
    """
    rows, cols = (loss_mask[:, 1:] != 0).nonzero(as_tuple=True)
    return rows, cols + 1


def _selected_logprobs(
    head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    suppress_ids: torch.Tensor | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` (N,) and entropy (N,) of the tempered next-token distribution at ``hidden`` (N, H).

    The distribution is the one a sampler draws from at ``temperature``: ``softmax(logits / T)`` over the ids it
    may emit (``suppress_ids`` are set to −inf, as the rollout engines ban them), in float32.
    """
    z = head(hidden).float()
    if temperature != 1.0:
        z = z / temperature
    if suppress_ids is not None and suppress_ids.numel():
        z = z.index_fill(-1, suppress_ids, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    ent = algorithms.entropy_from_logits(z[None])[0] if with_entropy else None
    return lp, ent


def token_logprobs(
    model,
    batch: EpisodeBatch,
    *,
    with_entropy: bool = False,
    temperature: float = 1.0,
    suppress_ids: Sequence[int] | torch.Tensor | None = None,
    chunk_size: int = 512,
    dedupe_images: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked per-token log-probs (B, L) and optionally entropies (B, L) of ``batch`` under ``model``.

    Values at positions where ``loss_mask`` is 0 are 0. Differentiable (call under ``torch.no_grad`` for
    old/reference log-probs). Equal, row by row, to calling it one episode at a time.

    ``temperature`` and ``suppress_ids`` make these the log-probs of the distribution the rollout sampled from
    (METHOD.md §2b): logits divided by the sampling temperature, ids the engine never emits excluded.

    Memory: the LM head and the log-softmax run only at the loss positions (N of them, not B·L: prompt, image and
    padding tokens get no logits at all), ``chunk_size`` positions at a time. With autograd on, every chunk is
    recomputed in the backward (activation checkpointing), so what the backward keeps of the head is the (N, H)
    hidden states, never (N, V) logits; the peak holds one chunk's (chunk, V) float32 logits and their softmax.

    ``dedupe_images``: the vision tower runs once per distinct image of the batch (:func:`forward_hidden`).
    """
    head = model.lm_head if hasattr(model, "lm_head") else model.module.lm_head
    hidden = forward_hidden(model, batch, dedupe_images=dedupe_images)
    b, length = batch.input_ids.shape
    rows, cols = loss_positions(batch.loss_mask)
    if batch.packed is None:
        h = hidden[rows, cols - 1]  # position t - 1 predicts token t
    else:  # the same position, found in the packed rows
        p = batch.packed
        h = hidden[p.row[rows, cols - 1], p.col[rows, cols - 1]]
    targets = batch.input_ids[rows, cols]
    suppress = None
    if suppress_ids is not None:
        suppress = torch.as_tensor(suppress_ids, dtype=torch.long, device=hidden.device)
    checkpointed = torch.is_grad_enabled() and h.requires_grad

    def part(h_c: torch.Tensor, t_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _selected_logprobs(
            head, h_c, t_c, temperature=temperature, suppress_ids=suppress, with_entropy=with_entropy
        )

    lps, ents = [], []
    for start in range(0, h.shape[0], chunk_size):
        h_c, t_c = h[start : start + chunk_size], targets[start : start + chunk_size]
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            lp_c, ent_c = checkpoint(part, h_c, t_c, use_reentrant=False)
        else:
            lp_c, ent_c = part(h_c, t_c)
        lps.append(lp_c)
        if with_entropy:
            ents.append(ent_c)
    zeros = hidden.new_zeros((b, length), dtype=torch.float32)
    if not lps:  # nothing to score: keep the graph connected so a backward still reaches every rank's hooks
        logp = zeros + 0.0 * hidden.sum()
        return logp, (logp.clone() if with_entropy else None)
    logp = zeros.index_put((rows, cols), torch.cat(lps))
    ent = zeros.index_put((rows, cols), torch.cat(ents)) if with_entropy else None
    return logp, ent
