"""Token grid coordinates and the optional learned factorised position embedding.

Dimension legend:
    B  batch
    N  tokens (a full grid, flattened row-major: the first axis varies slowest)
    D  embedding width
    A  position axes
    n_a  grid size along axis a (e.g. time patches, frequency patches, rows, columns)

By default tokenizers only *report* positions; the backbone turns them into per-axis rotary
embeddings, which extend to any grid size. `AxialPositionEmbedding` is the alternative from
DESIGN.md §2 (AST / PaSST style): one learned table per axis, summed, added to the embeddings.
For a grid smaller than the table the table is cropped (PaSST crops time so short clips are cheap
and keep the embeddings they were trained with); for a larger grid it is linearly interpolated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grid_positions(sizes: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """(N, A) float integer coordinates of every cell of a row-major grid of shape `sizes`."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in sizes]
    return torch.cartesian_prod(*axes).reshape(-1, len(sizes))  # (N, A); 1 axis would be (N,)


class AxialPositionEmbedding(nn.Module):
    """Learned factorised positions: embedding(i_1, ..., i_A) = sum_a table_a[i_a].

    dim:  embedding width D.
    grid: table length per axis, i.e. the grid seen in training (e.g. (62, 8) for 10 s of
          16x16 audio patches over 128 mel bins).
    """

    def __init__(self, dim: int, grid: tuple[int, ...]) -> None:
        super().__init__()
        if not grid or any(n < 1 for n in grid):
            raise ValueError(f"grid must name a positive size per axis, got {grid}")
        self.grid = tuple(int(n) for n in grid)
        self.tables = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.empty(n, dim), std=0.02)) for n in self.grid
        )

    def table(self, axis: int, size: int) -> Tensor:
        """(size, D) table for one axis: cropped when shorter than trained, else interpolated."""
        t = self.tables[axis]
        if size <= t.shape[0]:
            return t[:size]
        # (n_a, D) -> (1, D, n_a) for 1-D interpolation along the axis, then back.
        return F.interpolate(t.T[None], size=size, mode="linear", align_corners=True)[0].T

    def forward(self, sizes: tuple[int, ...]) -> Tensor:
        """(N, D) embedding of every cell of a row-major grid of shape `sizes`."""
        if len(sizes) != len(self.grid):
            raise ValueError(
                f"expected a grid with {len(self.grid)} axes {self.grid}, got {tuple(sizes)}"
            )
        A = len(sizes)
        out = 0
        for a, n in enumerate(sizes):
            shape = [1] * A + [-1]
            shape[a] = n
            out = out + self.table(a, n).reshape(shape)  # broadcast to (n_1, ..., n_A, D)
        return out.reshape(-1, out.shape[-1])  # (N, D)


def maybe_learned(dim: int, grid: tuple[int, ...] | None, num_axes: int) -> nn.Module | None:
    """The learned table a tokenizer adds when `learned_pos_grid` is given, else None."""
    if grid is None:
        return None
    if len(grid) != num_axes:
        raise ValueError(
            f"learned_pos_grid needs one size per position axis ({num_axes}), got {tuple(grid)}"
        )
    return AxialPositionEmbedding(dim, tuple(grid))
