"""Pooling of the backbone's token states into one clip vector, and the classifier on top.

Dimension legend:
    B batch, N tokens, D width, C classes

A pooling may also `prepare` the token stream before the backbone (the class-token pooling
prepends its token there), so the backbone itself never knows how the clip is summarised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from encoders.tokens import Tokens


def _masked_mean(hidden: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return hidden.mean(1)
    w = valid.to(hidden.dtype)[..., None]  # (B, N, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1)


class Pooling(nn.Module):
    def __init__(self, dim: int | None = None) -> None:
        super().__init__()

    def prepare(self, tokens: Tokens) -> Tokens:
        return tokens

    def forward(self, hidden: Tensor, valid: Tensor | None) -> Tensor:
        raise NotImplementedError


class MeanPooling(Pooling):
    """Mean over valid tokens (padding excluded)."""

    def forward(self, hidden: Tensor, valid: Tensor | None) -> Tensor:
        return _masked_mean(hidden, valid)


class ClassTokenPooling(Pooling):
    """A learned token prepended to the sequence; its final state is the clip vector.

    It gets its own segment and position 0 on every axis. A router may still give it fewer
    recursions: its state is read whatever depth it reached.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.token, std=0.02)

    def prepare(self, tokens: Tokens) -> Tokens:
        B, _, D = tokens.embeddings.shape
        A = tokens.positions.shape[-1]
        seg = torch.full((B, 1), tokens.num_segments, dtype=torch.long, device=self.token.device)
        pad = tokens.padding_mask
        regions = tokens.regions
        return tokens.replace(
            embeddings=torch.cat([self.token.expand(B, 1, D).to(tokens.embeddings.dtype), tokens.embeddings], 1),
            positions=torch.cat([tokens.positions.new_zeros(B, 1, A), tokens.positions], 1),
            segment_ids=torch.cat([seg, tokens.segment_ids], 1),
            modality_ids=torch.cat([tokens.modality_ids[:, :1], tokens.modality_ids], 1),
            padding_mask=None if pad is None else torch.cat([pad.new_zeros(B, 1), pad], 1),
            num_segments=tokens.num_segments + 1,
            contiguous_segments=False,  # the class token, of the last segment id, comes first
            regions=None if regions is None else torch.cat([regions.new_zeros(B, 1, A, 2), regions], 1),
        )

    def forward(self, hidden: Tensor, valid: Tensor | None) -> Tensor:
        return hidden[:, 0]


class AttentionPooling(Pooling):
    """One learned query attends over the valid tokens (multi-head)."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentionPooling: num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.query, std=0.02)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor, valid: Tensor | None) -> Tensor:
        B, N, D = hidden.shape
        H = self.num_heads
        k, v = self.kv(hidden).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        q = self.query.expand(B, 1, D).view(B, 1, H, D // H).transpose(1, 2)  # (B, H, 1, Dh)
        mask = None if valid is None else valid[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, D))


class ClassifierHead(nn.Module):
    """Pooled clip vector -> class logits."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc(self.dropout(pooled))
