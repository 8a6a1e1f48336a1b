"""Shared-prompt packing: the n rollouts of a prompt run their common prompt through the model ONCE.

The n episodes of one prompt begin with the same tokens: the system prompt, the overview image and the turn-1
question (``Episode.prompt_len`` tokens, on a real checkpoint ~1,300 of them are image tokens). A padded batch runs
that prompt n times. A *packed row* holds it once, followed by each episode's own continuation (both assistant
turns and the inserted turn 2 with its image)::

    [ prompt | continuation 1 | continuation 2 | … | padding ]

with attention in which the prompt is causal on itself and each continuation sees the prompt and, causally, itself
only. Every token keeps the 3-D M-RoPE position it has in its own episode (computed over the whole episode with the
model's ``get_rope_index``), so each token attends exactly the keys it has in its own episode, at the same
positions: the log-probs, hence the loss and its gradient, are those of the padded batch up to float summation
order, and the shared prompt's activations receive the sum of the n episodes' gradients through the one copy.

What it saves: the linear layers' work on (n − 1) copies of every prompt token (on the benchmark batch of the tiny
model 45 % of all sequence tokens; on the 7B recipe with 1,296 overview tokens and n = 8 about half the FLOPs),
and the attention over them: P²/2 + Σ S·(P + S/2) query-key pairs per row instead of n·(P + S)²/2.

Attention (:func:`shared_prompt_attention`) is structured, not a dense mask over the packed row: per row one causal
attention over the prompt, then one over the continuations as a batch, each continuation's queries against the
prompt's keys followed by its own, causal aligned to the lower right (no mask tensor; GPU kernels may skip the
masked blocks), with PyTorch's ``scaled_dot_product_attention`` whatever registered attention the model was loaded
with (``sdpa``, ``flash_attention_2``; not ``eager``, which transformers does not route through its registry). It
reaches the language model's attention layers through transformers' ``AttentionInterface``: the registered
functions are wrapped (:func:`install`) so that a :class:`SharedPromptMask` in the attention-mask slot selects
:func:`shared_prompt_attention` and every other mask goes to the original function unchanged (the vision tower,
``generate``, other models). Gradient checkpointing replays each layer with the same mask object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from mgpo_core.episodes import Episode


@dataclass
class _RowLayout:
    """One packed row: a prompt of ``prompt`` tokens, then continuations, then padding (to the rows' width).

    ``index`` (n, S) positions of each continuation's tokens in the row, right-padded to the longest (padding
    points at the row's position 0); ``flat`` (ΣS_i,) where the real tokens sit in the flattened (n·S) block. A row
    without continuations is one causal segment of ``prompt`` tokens.
    """

    prompt: int
    used: int
    index: torch.Tensor | None = None
    flat: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> _RowLayout:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return _RowLayout(self.prompt, self.used, mv(self.index), mv(self.flat))


class SharedPromptMask:
    """Stands in the attention-mask slot of the language model's layers for packed rows; carries their layout.

    Built from the rows' segment ids (0 prompt, k ≥ 1 the k-th continuation, −1 padding): a row's continuations
    are contiguous and in order after its prompt, as :func:`pack_batch` lays them out.
    """

    def __init__(self, rows: list[_RowLayout], width: int) -> None:
        self.rows = rows
        self.width = width

    @classmethod
    def from_segments(cls, segment: torch.Tensor) -> SharedPromptMask:
        rows = []
        for seg in segment.cpu():
            prompt = int((seg == 0).sum())
            lengths = [int((seg == k).sum()) for k in range(1, int(seg.max()) + 1)]
            used = prompt + sum(lengths)
            if not lengths:
                rows.append(_RowLayout(prompt, used))
                continue
            ar = torch.arange(max(lengths))
            starts = torch.tensor([prompt + sum(lengths[:i]) for i in range(len(lengths))])
            own = ar[None, :] < torch.tensor(lengths)[:, None]
            index = torch.where(own, starts[:, None] + ar[None, :], torch.zeros((), dtype=torch.long))
            rows.append(_RowLayout(prompt, used, index, own.reshape(-1).nonzero().squeeze(-1)))
        return cls(rows, int(segment.shape[1]))

    def to(self, device: torch.device | str) -> SharedPromptMask:
        return SharedPromptMask([r.to(device) for r in self.rows], self.width)


def _expand_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, L, D) → (B, H_kv·n_rep, L, D), each key/value head repeated for its query heads (GQA)."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def shared_prompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SharedPromptMask,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """Attention over packed rows: ``query`` (R, H, Lp, D), ``key``/``value`` (R, H_kv, Lp, D) → (R, Lp, H, D).

    Per row: the prompt attends causally to itself; the continuations, batched, attend to the whole prompt and
    causally to their own tokens. Padding positions get zeros (nothing reads them).
    """
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = _expand_heads(key, n_rep), _expand_heads(value, n_rep)
    outs = []
    for r, row in enumerate(layout.rows):
        q, k, v = query[r], key[r], value[r]  # (H, Lp, D)
        p = row.prompt
        head = F.scaled_dot_product_attention(
            q[None, :, :p], k[None, :, :p], v[None, :, :p], is_causal=True, dropout_p=dropout, scale=scaling
        )[0]
        parts = [head]
        if row.index is not None:
            idx = row.index
            n, s = idx.shape
            qc = q[:, idx].transpose(0, 1)  # (n, H, S, D)
            kc = torch.cat([k[None, :, :p].expand(n, -1, -1, -1), k[:, idx].transpose(0, 1)], dim=2)
            vc = torch.cat([v[None, :, :p].expand(n, -1, -1, -1), v[:, idx].transpose(0, 1)], dim=2)
            # Keys [prompt | own, right-padded]: causal aligned to the lower right lets query j see the prompt and
            # own keys 0..j, never the padding after its continuation (its keys start at p + its length > p + j).
            cont = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=causal_lower_right(s, p + s), dropout_p=dropout, scale=scaling
            )  # (n, H, S, D)
            parts.append(cont.transpose(0, 1).reshape(cont.shape[1], n * s, cont.shape[3])[:, row.flat])
        if row.used < layout.width:
            parts.append(q.new_zeros(q.shape[0], layout.width - row.used, q.shape[2]))
        outs.append(torch.cat(parts, dim=1))
    return torch.stack(outs).transpose(1, 2).contiguous(), None


_WRAPPED = "_mgpo_shared_prompt_base"


def install() -> None:
    """Route :class:`SharedPromptMask` masks to :func:`shared_prompt_attention` in every attention function
    transformers has registered (``sdpa``, ``flash_attention_*``, …); anything else reaches the original function.
    Idempotent; a function registered after this call is not wrapped (call it again). ``eager`` is each model's
    own module-level function, not a registered one, so it is left alone (packing refuses it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in list(ALL_ATTENTION_FUNCTIONS):
        base = ALL_ATTENTION_FUNCTIONS[name]
        if getattr(base, _WRAPPED, None) is not None:
            continue

        def attention(module, query, key, value, attention_mask, *args, _base=base, **kwargs):  # noqa: ANN001, ANN202
            if isinstance(attention_mask, SharedPromptMask):
                drop = kwargs.get("dropout", args[0] if args else 0.0)
                return shared_prompt_attention(
                    module, query, key, value, attention_mask, scaling=kwargs.get("scaling"), dropout=drop
                )
            return _base(module, query, key, value, attention_mask, *args, **kwargs)

        setattr(attention, _WRAPPED, base)
        ALL_ATTENTION_FUNCTIONS[name] = attention


@dataclass
class PackedRows:
    """A collated batch as the model runs it, with each shared prompt once.

    Shapes: ``input_ids``, ``mm_token_type_ids`` (R, Lp); ``position_ids`` (3, R, Lp); ``pixel_values`` (ΣN, D) in
    packed order; ``image_grid_thw`` (n_images, 3); ``row``, ``col`` (B, L): where token t of episode b sits in the
    packed rows. ``layout``: what every layer's attention needs to know of the rows, built once when packing.
    """

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    layout: SharedPromptMask
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    row: torch.Tensor
    col: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedRows:
        pv = self.pixel_values
        if pv is not None:
            pv = pv.to(device, dtype) if dtype is not None else pv.to(device)
        return PackedRows(
            self.input_ids.to(device),
            self.mm_token_type_ids.to(device),
            self.position_ids.to(device),
            self.layout.to(device),
            pv,
            None if self.image_grid_thw is None else self.image_grid_thw.to(device),
            self.row.to(device),
            self.col.to(device),
        )

    @property
    def tokens(self) -> int:
        """Non-padding tokens the model runs."""
        return sum(row.used for row in self.layout.rows)


def _image_slices(ep: Episode) -> list[torch.Tensor]:
    if not ep.image_grid_thw.numel():
        return []
    return list(torch.split(ep.pixel_values, ep.image_grid_thw.prod(-1).tolist()))


def _images_before(ep: Episode, end: int) -> int | None:
    """How many of ``ep``'s images lie wholly in its first ``end`` tokens; None when ``end`` cuts an image span."""
    img = ep.mm_token_type_ids[: ep.length] != 0
    if 0 < end < ep.length and img[end - 1] and img[end]:
        return None
    starts = img[:end].int().diff(prepend=torch.zeros(1, dtype=torch.int32)) == 1
    return int(starts.sum())


def _shares_prompt(first: Episode, other: Episode, n_images: int) -> bool:
    p = first.prompt_len
    if other.prompt_len != p or other.length < p or not torch.equal(first.input_ids[:p], other.input_ids[:p]):
        return False
    a, b = _image_slices(first)[:n_images], _image_slices(other)[:n_images]
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(gx, gy)
        for x, y, gx, gy in zip(a, b, first.image_grid_thw[:n_images], other.image_grid_thw[:n_images], strict=True)
    )


def prompt_groups(episodes: Sequence[Episode]) -> list[tuple[list[int], int, int]]:
    """``(members, prompt_len, prompt_images)`` per packed row, in order of first appearance.

    Episodes of one ``group`` whose first ``prompt_len`` tokens and the images in them are equal share a row (the
    equality is checked, not assumed: an episode that differs gets a row of its own, ``prompt_len`` 0).
    """
    rows: list[tuple[list[int], int, int]] = []
    open_rows: dict[int, int] = {}
    for i, ep in enumerate(episodes):
        r = open_rows.get(ep.group)
        if r is not None:
            members, p, n_img = rows[r]
            if _shares_prompt(episodes[members[0]], ep, n_img):
                members.append(i)
                continue
        n_img = _images_before(ep, ep.prompt_len) if 0 < ep.prompt_len <= ep.length else None
        if n_img is None:
            rows.append(([i], 0, 0))
            continue
        open_rows[ep.group] = len(rows)
        rows.append(([i], ep.prompt_len, n_img))
    return [(m, p, n) if len(m) > 1 else (m, 0, 0) for m, p, n in rows]


def _row_length(episodes: Sequence[Episode], members: list[int], prompt: int) -> int:
    """Tokens of one packed row: the shared prompt once, then every member's continuation."""
    return prompt + sum(episodes[i].length - prompt for i in members)


def packed_tokens(episodes: Sequence[Episode]) -> int:
    """Tokens the model runs for ``episodes`` packed as one micro-batch (each shared prompt once)."""
    return sum(_row_length(episodes, m, p) for m, p, _ in prompt_groups(episodes))


def pack_batch(
    episodes: Sequence[Episode], position_ids: torch.Tensor, pad_id: int, width: int
) -> PackedRows | None:
    """Pack ``episodes`` (collated with ``position_ids`` (3, B, L), ``width`` = L) so each shared prompt runs once.

    Returns None when no two episodes share a prompt (the padded batch is then already the least work).
    """
    rows = prompt_groups(episodes)
    if all(len(m) == 1 for m, _, _ in rows):
        return None
    lengths = [_row_length(episodes, m, p) for m, p, _ in rows]
    r_count, lp = len(rows), max(lengths)
    ids = torch.full((r_count, lp), pad_id, dtype=torch.long)
    mm = torch.zeros((r_count, lp), dtype=torch.int32)
    pos = torch.zeros((3, r_count, lp), dtype=position_ids.dtype)
    seg = torch.full((r_count, lp), -1, dtype=torch.int32)
    row = torch.zeros((len(episodes), width), dtype=torch.long)
    col = torch.zeros((len(episodes), width), dtype=torch.long)
    pixels: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    for r, (members, p, n_img) in enumerate(rows):
        first = episodes[members[0]]
        ids[r, :p], mm[r, :p], seg[r, :p] = first.input_ids[:p], first.mm_token_type_ids[:p], 0
        pos[:, r, :p] = position_ids[:, members[0], :p]
        pixels += _image_slices(first)[:n_img]
        grids += list(first.image_grid_thw[:n_img])
        at = p
        for k, b in enumerate(members, start=1):
            ep = episodes[b]
            n = ep.length - p
            ids[r, at : at + n], mm[r, at : at + n] = ep.input_ids[p:], ep.mm_token_type_ids[p:]
            pos[:, r, at : at + n] = position_ids[:, b, p : ep.length]
            seg[r, at : at + n] = k if p else 0
            row[b, : ep.length] = r
            col[b, :p] = torch.arange(p)
            col[b, p : ep.length] = torch.arange(at, at + n)
            pixels += _image_slices(ep)[n_img:]
            grids += list(ep.image_grid_thw[n_img:])
            at += n
    return PackedRows(
        ids,
        mm,
        pos,
        SharedPromptMask.from_segments(seg),
        torch.cat(pixels) if pixels else None,
        torch.stack(grids) if grids else None,
        row,
        col,
    )
