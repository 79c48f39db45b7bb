"""Per-axis (axial) rotary position embeddings.

Dimension legend:
    B batch, N tokens, A position axes, H heads, Dh head dim, P = Dh // 2 rotated channel pairs

The P channel pairs of every head are split between the A axes (as evenly as possible); each axis
rotates its pairs by angles position_a * inv_freq. Rotation angles are computed once per forward
from the token positions and then gathered with the tokens, so a token keeps its own time /
frequency / row / column however many neighbours were dropped by the router.
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

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, N, A') -> cos, sin (B, N, P); axes beyond A' are treated as position 0."""
        A = positions.shape[-1]
        if A > self.num_axes:
            raise ValueError(
                f"positions have {A} axes but the backbone rotates {self.num_axes} "
                f"(BackboneConfig.rope_axes); raise rope_axes to {A}"
            )
        if A < self.num_axes:
            positions = torch.nn.functional.pad(positions, (0, self.num_axes - A))
        angles = positions.float()[..., self.axis_of_pair] * self.inv_freq  # (B, N, P)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, N, Dh) rotated by cos/sin (B, N, P) with P = Dh // 2 (half-split pairing)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # (B, 1, N, P)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
