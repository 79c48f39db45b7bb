"""Video tokenizer: t x p x p tubelets through one Conv3d (VideoMAE), or per-frame patches (t=1).

Dimension legend:
    B  batch
    T  frames (any multiple of the tubelet size t)
    C  channels
    H, W  frame height and width in pixels (multiples of the patch size p)
    n, h, w  tubelet grid: time slices T // t, rows H // p, columns W // p
    N  tokens = n * h * w, ordered (time, row, column) row-major
    D  embedding width

Positions are (time slice, row, column) indices; regions are seconds (from `frame_rate`) and
pixels. Fixed-size clips have no padding (padding_mask None).

Segments (the routing unit, DESIGN.md §3 "per-segment routing"):
    "slice": one tubelet time slice, i.e. every patch of the same frames (default);
    "tube":  one spatial location across all time slices;
    "token": every token its own segment.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from .image import IMAGENET_MEAN, IMAGENET_STD, check_pixel_stats
from .positions import grid_positions, maybe_learned
from .tokens import Tokens

SEGMENTS = ("slice", "tube", "token")


class VideoTokenizer(nn.Module):
    """(B, T, C, H, W) in [0, 1] -> Tokens with axes ("time", "height", "width").

    dim:              embedding width D.
    patch_size:       p, spatial tubelet size.
    tubelet_size:     t, frames per tubelet; 1 gives per-frame patches.
    in_channels:      C.
    frame_rate:       frames per second of the clips as the tokenizer receives them (after any
                      temporal subsampling in the data pipeline); only used for time regions
                      and the shared audio-video time axis.
    segment:          "slice" | "tube" | "token" (see module docstring).
    mean, std:        per-channel normalisation (torchvision v2.Normalize).
    learned_pos_grid: None = rotary only; (n, h, w) = also add learned factorised embeddings.
    modality_id:      value of Tokens.modality_ids.
    """

    input_keys: tuple[str, ...] = ("video",)

    def __init__(
        self,
        dim: int,
        patch_size: int = 16,
        tubelet_size: int = 2,
        in_channels: int = 3,
        frame_rate: float = 25.0,
        segment: str = "slice",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        learned_pos_grid: tuple[int, int, int] | None = None,
        modality_id: int = 1,
    ) -> None:
        super().__init__()
        if segment not in SEGMENTS:
            raise ValueError(f"segment must be one of {SEGMENTS}, got {segment!r}")
        if patch_size < 1 or tubelet_size < 1 or frame_rate <= 0:
            raise ValueError(
                f"patch_size, tubelet_size and frame_rate must be positive, got "
                f"{patch_size}, {tubelet_size}, {frame_rate}"
            )
        check_pixel_stats(in_channels, mean, std)
        self.dim, self.patch_size, self.tubelet_size = dim, patch_size, tubelet_size
        self.in_channels, self.frame_rate, self.segment = in_channels, frame_rate, segment
        self.modality_id = modality_id
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=kernel)
        self.pos_embed = maybe_learned(dim, learned_pos_grid, num_axes=3)

    @property
    def slice_seconds(self) -> float:
        """Duration of one tubelet time slice: the step of the time position axis."""
        return self.tubelet_size / self.frame_rate

    def check(self, video: Tensor) -> None:
        if video.dim() != 5 or video.shape[2] != self.in_channels:
            raise ValueError(
                f"video must be (B, T, C={self.in_channels}, H, W), got {tuple(video.shape)}"
            )
        _, T, _, H, W = video.shape
        t, p = self.tubelet_size, self.patch_size
        if T == 0 or T % t:
            raise ValueError(
                f"video frames T must be a positive multiple of tubelet_size={t}, got T={T} "
                f"(shape {tuple(video.shape)})"
            )
        if H == 0 or W == 0 or H % p or W % p:
            raise ValueError(
                f"video height and width must be positive multiples of patch_size={p}, "
                f"got (H, W) = ({H}, {W}) (shape {tuple(video.shape)})"
            )

    def grid(self, video_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(n, h, w) token grid for a (B, T, C, H, W) shape."""
        _, T, _, H, W = video_shape
        return T // self.tubelet_size, H // self.patch_size, W // self.patch_size

    def segments(self, n: int, h: int, w: int, device=None) -> tuple[Tensor, int, int]:
        """(N,) segment ids of the grid, num_segments and max_segment_len (static ints)."""
        ids = torch.arange(n * h * w, device=device).view(n, h * w)  # (n, h*w)
        if self.segment == "slice":
            return ids // (h * w), n, h * w
        if self.segment == "tube":
            return ids % (h * w), h * w, n
        return ids.reshape(-1), n * h * w, 1

    def regions(self, n: int, h: int, w: int, device=None) -> Tensor:
        """(N, 3, 2) [start, end) of each token: seconds, pixel rows, pixel columns."""
        pos = grid_positions((n, h, w), device=device)  # (N, 3)
        scale = torch.tensor(
            [self.slice_seconds, self.patch_size, self.patch_size], device=device
        )
        return torch.stack((pos * scale, (pos + 1) * scale), dim=-1)  # (N, 3, 2)

    def forward(self, video: Tensor) -> Tokens:
        self.check(video)
        B = video.shape[0]
        x = self.normalize(video).transpose(1, 2)  # (B, C, T, H, W) for Conv3d
        x = self.proj(x)  # (B, D, n, h, w)
        _, D, n, h, w = x.shape
        N = n * h * w
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), (time, row, column) row-major
        if self.pos_embed is not None:
            x = x + self.pos_embed((n, h, w)).to(x.dtype)
        seg, num_segments, max_len = self.segments(n, h, w, device=x.device)
        pos = grid_positions((n, h, w), device=x.device)  # (N, 3)
        return Tokens(
            embeddings=x,
            positions=pos.expand(B, N, 3),
            segment_ids=seg.reshape(-1).expand(B, N),
            modality_ids=torch.full((B, N), self.modality_id, dtype=torch.long, device=x.device),
            padding_mask=None,
            num_segments=num_segments,
            max_segment_len=max_len,
            regions=self.regions(n, h, w, device=x.device).expand(B, N, 3, 2),
            axes=("time", "height", "width"),
            contiguous_segments=self.segment != "tube",  # tubes stride across time slices
        )
