"""Per-axis (axial) rotary position embeddings.

Dimension legend:
    B batch, N tokens, A position axes, H heads, Dh head dim, P = Dh // 2 rotated channel pairs

The P channel pairs of every head are split between the A axes (as evenly as possible); each axis
rotates its pairs by angles position_a * inv_freq. The rotation table is computed once per forward
from the token positions and then gathered with the tokens, so a token keeps its own time /
frequency / row / column however many neighbours were dropped by the router.

The table is one (B, N, 2, Dh) tensor, [cos | cos] and [-sin | sin] over the half-split pairs, so a
routed step gathers it with one op and `apply_rotary` rotates queries and keys together with three
kernels (a halves swap, a multiply, a multiply-add) instead of seven per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AxialRotary(nn.Module):
    def __init__(self, head_dim: int, num_axes: int, theta: float = 100.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        pairs = head_dim // 2
        self.num_axes = num_axes
        # Split the pairs between axes; each axis spans its own frequency ladder so that a short
        # axis (e.g. 8 frequency patches) and a long one (e.g. 600 time steps) both get both fine
        # and coarse frequencies.
        sizes = [pairs // num_axes + (a < pairs % num_axes) for a in range(num_axes)]
        inv_freq, axis_of_pair = [], []
        for a, n in enumerate(sizes):
            inv_freq.append(theta ** (-torch.arange(n, dtype=torch.float64) / n))
            axis_of_pair.append(torch.full((n,), a, dtype=torch.long))
        self.register_buffer("inv_freq", torch.cat(inv_freq).float(), persistent=False)  # (P,)
        self.register_buffer("axis_of_pair", torch.cat(axis_of_pair), persistent=False)  # (P,)

    def forward(self, positions: Tensor) -> Tensor:
        """positions (B, N, A') -> rotation table (B, N, 2, Dh); axes beyond A' are at position 0."""
        A = positions.shape[-1]
        if A > self.num_axes:
            raise ValueError(
                f"positions have {A} axes but the backbone rotates {self.num_axes} "
                f"(BackboneConfig.rope_axes); raise rope_axes to {A}"
            )
        if A < self.num_axes:
            positions = torch.nn.functional.pad(positions, (0, self.num_axes - A))
        angles = positions.float()[..., self.axis_of_pair] * self.inv_freq  # (B, N, P)
        cos, sin = angles.cos(), angles.sin()
        return torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), -2)


def apply_rotary(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate x (B, K, ..., Dh), tokens on dim 1 (e.g. (B, K, 2, H, Dh) for q and k together),
    by the table rope (B, K, 2, Dh): x * [cos|cos] + [x2|x1] * [-sin|sin] (half-split pairing)."""
    B, K, *mid, Dh = x.shape
    rope = rope.to(x.dtype).view(B, K, *([1] * len(mid)), 2, Dh)
    swapped = x.unflatten(-1, (2, Dh // 2)).flip(-2).flatten(-2)  # [x1|x2] -> [x2|x1]
    return torch.addcmul(x * rope[..., 0, :], swapped, rope[..., 1, :])
