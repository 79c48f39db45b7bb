"""Routing units: single tokens, or whole segments (a frame, a tubelet slice, an audio window).

Dimension legend:
    B batch, N tokens, U units (N for tokens; the static segment bound for segments)

Routers score, rank and select units; `Units` pools token quantities to units and broadcasts unit
decisions back to tokens, so one code path serves per-token and per-segment routing. Everything
has static shapes (U is a Python int from the tokenizer), so nothing syncs with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

# Capacities like 2/3 are not exact in binary floating point; rounding the product before the
# ceiling keeps ceil(2/3 * 9) == 6 on host and device alike.
_ROUND = 1e6


def capacity_count(capacity: float, n: int) -> int:
    """Units kept out of n at this capacity: ceil(capacity * n), at least 1 when n > 0."""
    return max(min(n, 1), math.ceil(round(capacity * n * _ROUND) / _ROUND))


def capacity_counts(capacity: float, n: Tensor) -> Tensor:
    """capacity_count for a (B,) tensor of counts, without leaving the device."""
    k = torch.ceil(torch.round(n.double() * capacity * _ROUND) / _ROUND).long()
    return torch.maximum(k, n.clamp(max=1))


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, *F), index (B, K) -> (B, K, *F): the rows each sample's index picks."""
    shape = (*index.shape, *x.shape[2:])
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def gather_blocks(x: Tensor, index: Tensor, block_len: int) -> Tensor:
    """x (B, U * L, *F) as U blocks of L = block_len rows, index (B, K) -> (B, K * L, *F): the
    blocks each sample's index picks, one gather without an index per token."""
    if block_len == 1:
        return gather_rows(x, index)
    return gather_rows(x.unflatten(1, (-1, block_len)), index).flatten(1, 2)


def scatter_blocks(parent: Tensor, index: Tensor, src: Tensor, block_len: int,
                   inplace: bool) -> Tensor:
    """The inverse of gather_blocks: src (B, K * L, *F) written to the blocks `index` picks of
    parent (B, U * L, *F), in place or into a copy."""
    p, s = parent, src
    if block_len > 1:
        p, s = parent.unflatten(1, (-1, block_len)), src.unflatten(1, (-1, block_len))
    rows = index.view(*index.shape, *([1] * (s.dim() - 2))).expand_as(s)
    out = p.scatter_(1, rows, s) if inplace else p.scatter(1, rows, s)
    return out if block_len == 1 else out.flatten(1, 2)


def _spread_blocks(u: Tensor, block_len: int) -> Tensor:
    """(B, U, *F) -> (B, U * block_len, *F): each unit's value on its block of tokens."""
    return u.unsqueeze(2).expand(-1, -1, block_len, *u.shape[2:]).flatten(1, 2)


def _spread_ids(u: Tensor, segment_ids: Tensor) -> Tensor:
    """(B, U, *F) -> (B, N, *F): each token gets the value of its segment."""
    B, N = segment_ids.shape
    extra = u.shape[2:]
    return u.gather(1, segment_ids.view(B, N, *([1] * len(extra))).expand(B, N, *extra))


@dataclass
class Units:
    segment_ids: Tensor | None  # (B, N) unit of each token; None for tokens and blocks
    token_valid: Tensor | None  # (B, N) bool; None when nothing is padded
    valid: Tensor | None  # (B, U) bool, the units that exist; None when all U exist
    count: Tensor | None  # (B,) number of existing units; None when every sample has all U
    size: Tensor | None  # (B, U) valid tokens per unit (segments only)
    num_units: int  # U, static
    max_len: int  # static bound on tokens per unit
    full: bool = False  # static: every unit exists and holds exactly max_len tokens (no padding)
    # Static count that capacities are fractions of: num_units, except for the backbone's compact
    # working set (the units still active out of the sequence's `population`).
    population: int | None = None

    def __post_init__(self) -> None:
        if self.population is None:
            self.population = self.num_units

    @classmethod
    def tokens(cls, token_valid: Tensor | None, length: int, population: int | None = None) -> Units:
        count = None if token_valid is None else token_valid.sum(-1)
        full = token_valid is None
        return cls(None, token_valid, token_valid, count, None, length, 1, full, population)

    @classmethod
    def blocks(cls, num_blocks: int, block_len: int, population: int) -> Units:
        """Whole segments stored one after the other, unit u being tokens u * block_len ..
        (u + 1) * block_len - 1: the compact working set of a segment-routed forward, where the
        gathered segments are laid out so (no segment ids needed)."""
        return cls(None, None, None, None, None, num_blocks, block_len, True, population)

    @classmethod
    def segments(
        cls, segment_ids: Tensor, token_valid: Tensor | None, num_segments: int, max_len: int
    ) -> Units:
        B, N = segment_ids.shape
        seg = segment_ids
        # The static bounds decide how many tokens a step gathers: ids out of range or a
        # segment longer than max_len would be selected but never computed. Checked on the
        # device (no host sync); a tokenizer bug then fails loudly instead of silently.
        torch._assert_async(
            ((seg >= 0) & (seg < num_segments)).all(),
            f"Tokens.segment_ids must lie in [0, num_segments={num_segments})",
        )
        w = (
            torch.ones(B, N, device=seg.device)
            if token_valid is None
            else token_valid.to(torch.float32)
        )
        size = torch.zeros(B, num_segments, device=seg.device).scatter_add(1, seg, w)  # (B, U)
        torch._assert_async(
            (size <= max_len).all(),
            f"a segment holds more than Tokens.max_segment_len={max_len} valid tokens",
        )
        valid = size > 0
        # No padding and U * max_len == N: every segment holds exactly max_len tokens (none can
        # hold more), so unit counts translate into token counts statically.
        full = token_valid is None and num_segments * max_len == N
        return cls(seg, token_valid, valid, valid.sum(-1), size, num_segments, max_len, full)

    @property
    def is_tokens(self) -> bool:
        return self.segment_ids is None and self.max_len == 1

    def counts(self, batch: int, device) -> Tensor:
        """(B,) number of existing units."""
        if self.count is not None:
            return self.count
        return torch.full((batch,), self.num_units, dtype=torch.long, device=device)

    def all_valid(self, batch: int, device) -> Tensor:
        if self.valid is not None:
            return self.valid
        return torch.ones(batch, self.num_units, dtype=torch.bool, device=device)

    def pool(self, x: Tensor) -> Tensor:
        """Mean over each unit's valid tokens: (B, N, *F) -> (B, U, *F)."""
        if self.is_tokens:
            return x
        if self.segment_ids is None:  # blocks
            return x.unflatten(1, (self.num_units, self.max_len)).mean(2)
        B, N = self.segment_ids.shape
        extra = x.shape[2:]
        w = self.token_valid
        xw = x if w is None else x * w.view(B, N, *([1] * len(extra))).to(x.dtype)
        idx = self.segment_ids.view(B, N, *([1] * len(extra))).expand_as(x)
        total = x.new_zeros(B, self.num_units, *extra).scatter_add(1, idx, xw)
        size = self.size.clamp(min=1).view(B, self.num_units, *([1] * len(extra)))
        return total / size.to(x.dtype)

    def broadcast(self, u: Tensor) -> Tensor:
        """Unit values back to tokens: (B, U, *F) -> (B, N, *F)."""
        if self.is_tokens:
            return u
        if self.segment_ids is None:
            return _spread_blocks(u, self.max_len)
        return _spread_ids(u, self.segment_ids)

    def broadcaster(self) -> Callable[[Tensor], Tensor] | None:
        """`broadcast` as a function of plain values, for results that outlive the forward (a
        compiled graph can return it; these Units it cannot); None for tokens (identity)."""
        if self.is_tokens:
            return None
        if self.segment_ids is None:
            return partial(_spread_blocks, block_len=self.max_len)
        return partial(_spread_ids, segment_ids=self.segment_ids)

    def gather_size(self, units_kept: int) -> int:
        """Static bound on tokens in `units_kept` units."""
        N = self.num_units * self.max_len if self.segment_ids is None else self.segment_ids.shape[1]
        return min(N, units_kept * self.max_len)

    def rows_of(self, index: Tensor) -> tuple[Tensor, int]:
        """Units `index` (B, K) as gather_blocks reads them, (index, L): whole blocks of L rows by
        unit index (tokens: L = 1), or for segments found by id, their tokens one by one."""
        if self.segment_ids is not None:
            return self.token_index(index), 1
        return index, self.max_len

    def kept(self, kept: int) -> Units:
        """The units of a compact working set that keeps `kept` of these, gathered whole, one
        after the other (MoRBackbone's compact loop)."""
        if self.is_tokens:
            return Units.tokens(None, kept, self.population)
        return Units.blocks(kept, self.max_len, self.population)

    def token_index(self, index: Tensor) -> Tensor:
        """(B, K) indices of whole units -> (B, K * max_len) indices of their tokens, unit by
        unit. Full units only: every unit holds exactly max_len tokens."""
        L = self.max_len
        if self.segment_ids is None:  # tokens (L = 1) or blocks
            if L == 1:
                return index
            return (index[..., None] * L + torch.arange(L, device=index.device)).flatten(1)
        B, N = self.segment_ids.shape
        # Each segment's tokens, in sequence order: one sort per forward, at the first gather.
        order = self.segment_ids.argsort(dim=1, stable=True).view(B, self.num_units, L)
        return gather_rows(order, index).flatten(1)
