"""Image tokenizer: non-overlapping p x p patches through timm's PatchEmbed.

Dimension legend:
    B  batch
    C  channels
    H, W  image height and width in pixels (any multiple of the patch size)
    h, w  patch grid rows and columns (H // p, W // p)
    N  tokens = h * w, row-major
    D  embedding width

Positions are (row, column) patch indices; regions are pixel spans. Every token is its own
segment and nothing is padded (padding_mask None: the backbone can use unmasked attention).
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torchvision.transforms import v2

from .positions import grid_positions, maybe_learned
from .tokens import Tokens

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_pixel_stats(in_channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    if len(mean) != len(std) or len(mean) not in (1, in_channels):
        raise ValueError(
            f"mean/std need 1 or in_channels={in_channels} values, got {len(mean)} and {len(std)}"
        )


class ImageTokenizer(nn.Module):
    """(B, C, H, W) in [0, 1] -> Tokens with axes ("height", "width").

    dim:              embedding width D.
    patch_size:       p; H and W must be multiples of it (the size is not fixed at construction).
    in_channels:      C.
    mean, std:        per-channel normalisation (torchvision v2.Normalize) applied to the input.
    learned_pos_grid: None (default) = rotary positions only, applied by the backbone; (h, w) =
                      also add learned factorised embeddings trained for that grid.
    modality_id:      value of Tokens.modality_ids.
    """

    input_keys: tuple[str, ...] = ("image",)

    def __init__(
        self,
        dim: int,
        patch_size: int = 16,
        in_channels: int = 3,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        learned_pos_grid: tuple[int, int] | None = None,
        modality_id: int = 2,
    ) -> None:
        super().__init__()
        check_pixel_stats(in_channels, mean, std)
        self.dim, self.patch_size, self.in_channels = dim, patch_size, in_channels
        self.modality_id = modality_id
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))
        # img_size=None: timm builds no fixed grid, so any multiple of the patch size passes;
        # NHWC output keeps the grid shape, which we need for positions.
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_channels, embed_dim=dim,
            output_fmt="NHWC",
        )
        self.pos_embed = maybe_learned(dim, learned_pos_grid, num_axes=2)

    def forward(self, image: Tensor) -> Tokens:
        if image.dim() != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"image must be (B, C={self.in_channels}, H, W), got {tuple(image.shape)}"
            )
        B, _, H, W = image.shape
        p = self.patch_size
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(
                f"image height and width must be positive multiples of patch_size={p}, "
                f"got (H, W) = ({H}, {W})"
            )
        x = self.patch_embed(self.normalize(image))  # (B, h, w, D)
        _, h, w, D = x.shape
        x = x.reshape(B, h * w, D)  # (B, N, D), row-major
        if self.pos_embed is not None:
            x = x + self.pos_embed((h, w)).to(x.dtype)
        pos = grid_positions((h, w), device=x.device)  # (N, 2) row, column
        regions = torch.stack((pos * p, (pos + 1) * p), dim=-1)  # (N, 2, 2) pixel [start, end)
        N = h * w
        return Tokens(
            embeddings=x,
            positions=pos.expand(B, N, 2),
            segment_ids=Tokens.default_segments(B, N, device=x.device),
            modality_ids=torch.full((B, N), self.modality_id, dtype=torch.long, device=x.device),
            padding_mask=None,
            num_segments=N,
            max_segment_len=1,
            contiguous_segments=True,
            regions=regions.expand(B, N, 2, 2),
            axes=("height", "width"),
        )
