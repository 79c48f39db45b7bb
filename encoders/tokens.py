"""The one record that every tokenizer returns and the backbone consumes as is.

Dimension legend:
    B  batch
    N  tokens (padded to the longest clip in the batch)
    D  embedding width
    A  position axes (e.g. time x frequency for audio, time x height x width for video)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class Tokens:
    """A batch of token streams.

    embeddings:      (B, N, D) float.
    positions:       (B, N, A) float coordinates per axis, in grid units (patch index along
                     frequency/height/width; time may be fractional when modalities share one
                     time axis). Travels with tokens when the backbone gathers a subset, so rotary
                     attention over a shortened set still knows where each token sits.
    segment_ids:     (B, N) long in [0, num_segments): the routing unit of each token (a frame, a
                     tubelet slice, an audio time window; each token its own segment by default).
    modality_ids:    (B, N) long (0 audio, 1 video, ... as the tokenizer defines).
    padding_mask:    (B, N) bool, True where the token is padding; None when nothing is padded,
                     which lets attention take its fastest unmasked kernels.
    num_segments:    static upper bound of segment ids (a Python int, known from shapes, so routing
                     by segment needs no host synchronisation).
    max_segment_len: static upper bound of tokens in one segment.
    regions:         optional (B, N, A, 2) float [start, end) of each token along each input axis in
                     input units (seconds for time, mel bins, pixels), for depth-allocation maps.
    axes:            names of the A axes, e.g. ("time", "freq").
    contiguous_segments: static: segment u is tokens u * max_segment_len .. (u + 1) *
                     max_segment_len - 1 of every sample, N = num_segments * max_segment_len. Set
                     by tokenizers whose layout guarantees it (video time slices, audio windows
                     of equal length); per-segment routing then treats segments as blocks of
                     the sequence, without pooling and sorting by id or checking ids on the
                     device.
    """

    embeddings: Tensor
    positions: Tensor
    segment_ids: Tensor
    modality_ids: Tensor
    padding_mask: Tensor | None = None
    num_segments: int | None = None
    max_segment_len: int = 1
    regions: Tensor | None = None
    axes: tuple[str, ...] = ()
    contiguous_segments: bool = False

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 3:
            raise ValueError(
                f"Tokens.embeddings must be (B, N, D), got shape {tuple(self.embeddings.shape)}"
            )
        B, N, _ = self.embeddings.shape
        if self.positions.dim() != 3 or self.positions.shape[:2] != (B, N):
            raise ValueError(
                f"Tokens.positions must be (B={B}, N={N}, A), got {tuple(self.positions.shape)}"
            )
        for name in ("segment_ids", "modality_ids", "padding_mask"):
            t = getattr(self, name)
            if t is not None and t.shape != (B, N):
                raise ValueError(f"Tokens.{name} must be (B={B}, N={N}), got {tuple(t.shape)}")
        for name in ("segment_ids", "modality_ids"):
            t = getattr(self, name)
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(f"Tokens.{name} must hold integer ids, got dtype {t.dtype}")
        if self.padding_mask is not None and self.padding_mask.dtype != torch.bool:
            raise ValueError(
                f"Tokens.padding_mask must be bool (True = padding), got dtype "
                f"{self.padding_mask.dtype}; convert with `mask.bool()`"
            )
        if self.max_segment_len < 1 or (self.num_segments is not None and self.num_segments < 1):
            raise ValueError(
                f"Tokens.num_segments={self.num_segments} and max_segment_len="
                f"{self.max_segment_len} must be >= 1"
            )
        if self.num_segments is None:
            # Each token its own segment unless the tokenizer says otherwise.
            self.num_segments = N
        if self.contiguous_segments and self.num_segments * self.max_segment_len != N:
            raise ValueError(
                f"Tokens.contiguous_segments needs N = num_segments x max_segment_len, got N={N}, "
                f"num_segments={self.num_segments}, max_segment_len={self.max_segment_len}; "
                f"leave it False unless segment u is tokens u * max_segment_len onwards"
            )
        if self.axes and len(self.axes) != self.positions.shape[-1]:
            raise ValueError(
                f"Tokens.axes names {len(self.axes)} axes {self.axes} but positions have "
                f"{self.positions.shape[-1]}"
            )

    @property
    def valid(self) -> Tensor | None:
        """(B, N) bool, True for real tokens; None when nothing is padded."""
        return None if self.padding_mask is None else ~self.padding_mask

    def content(self) -> Tensor:
        """(B, N) bool: tokens that stand for a part of the input. Padding is left out, and so
        are summary tokens such as a pooling's class token, whose time region is empty. Depth
        counts in predictions and analysis use this, so both count the same tokens."""
        B, N, _ = self.embeddings.shape
        valid = self.valid
        if valid is None:
            valid = torch.ones(B, N, dtype=torch.bool, device=self.embeddings.device)
        if self.regions is None:
            return valid
        return valid & (self.regions[..., 0, 1] > self.regions[..., 0, 0])

    def lengths(self) -> Tensor:
        """(B,) number of valid tokens per sample."""
        B, N, _ = self.embeddings.shape
        if self.padding_mask is None:
            return torch.full((B,), N, dtype=torch.long, device=self.embeddings.device)
        return (~self.padding_mask).sum(-1)

    def replace(self, **changes) -> Tokens:
        return replace(self, **changes)

    @staticmethod
    def default_segments(batch: int, length: int, device: torch.device | None = None) -> Tensor:
        """(B, N) segment ids where every token is its own segment."""
        return torch.arange(length, device=device).expand(batch, length)
