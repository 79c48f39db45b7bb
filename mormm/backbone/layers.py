"""Pre-norm transformer layer with rotary attention, parameter-compatible with timm's ViT Block.

Dimension legend:
    B batch, K tokens processed by this call (all tokens, or those a router selected),
    M key/value tokens (K for self-attention, N for recursive KV sharing), D width,
    H heads, Dh head dim, P = Dh // 2

The parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) match timm's
`vision_transformer.Block`, so timm ViT weights load directly (uptraining) and the layer can be
checked against timm numerically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from mormm.backbone import fused_routing
from mormm.backbone.casts import CastOnceLinear
from mormm.backbone.rotary import apply_rotary

Rope = Tensor | None  # rotation table (B, K, 2, Dh), see rotary.py
KV = tuple[Tensor, Tensor]  # keys (rotated), values: (B, H, M, Dh)


@dataclass(frozen=True)
class PrefixKeys:
    """Key padding in which each row's real slots come first, as routed steps lay out their
    gathered tokens (ranked, the taken ones first).

    On CUDA in half precision this runs as variable-length flash attention, with no mask: each
    row is two sequences, its n real slots and its M - n padding slots (padding attends only to
    padding; its outputs are discarded by the step). A key mask instead sends SDPA to masked
    kernels that took 1.4x to 2.5x as long at the routed shapes on the H200
    (benchmarks/results/nvidia-h200-prefix-attention.md).
    Elsewhere the mask is used.
    """

    mask: Tensor  # (B, M) bool, True for the first n[b] slots of row b
    cu_seqlens: Tensor  # (2B + 1,) int32 offsets of the 2B sequences in the flattened (B * M) rows

    @classmethod
    def of(cls, mask: Tensor, fused: bool = False) -> PrefixKeys:
        """fused: the offsets in one Triton launch instead of five small ops (eager inference,
        where each launch is host time; see fused_routing.py)."""
        if fused:
            return cls(mask, fused_routing.prefix_offsets(mask))
        B, M = mask.shape
        n = mask.sum(-1, dtype=torch.int32)
        lengths = torch.stack((n, M - n), 1).flatten()
        return cls(mask, F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)))


@dataclass(frozen=True)
class PackedRows:
    """Several groups of sequences laid end to end in one row (B = 1), each sequence attending
    only within itself: depth-wise batching packs the step inputs of the batches in flight so
    (depthwise.py). Group g holds `groups[g] = (b, n)`: b rows of n slots, each row one sequence,
    or, where `prefixes[g]` is given (a step with padding slots), two (PrefixKeys).

    On CUDA in half precision this runs as one variable-length flash attention over all the
    sequences (`cu_seqlens`, their offsets on the device); elsewhere as SDPA per group, with
    each group's key mask."""

    groups: tuple[tuple[int, int], ...]
    cu_seqlens: Tensor  # (S + 1,) int32 offsets of the S sequences in the packed rows
    prefixes: tuple[PrefixKeys | None, ...] | None = None  # per group; None: no padding slots

    @classmethod
    def of(cls, groups: tuple[tuple[int, int], ...], device: torch.device,
           prefixes: tuple[PrefixKeys | None, ...] | None = None) -> PackedRows:
        if prefixes is None or all(p is None for p in prefixes):  # static: offsets from the host
            offsets = [0]
            for b, n in groups:
                start = offsets[-1]
                offsets += [start + n * (i + 1) for i in range(b)]
            return cls(groups, torch.tensor(offsets, dtype=torch.int32).to(device))
        parts, start = [], 0
        for (b, n), p in zip(groups, prefixes):
            parts.append(torch.arange(start, start + b * n, n, dtype=torch.int32, device=device)
                         if p is None else p.cu_seqlens[:-1] + start)
            start += b * n
        parts.append(torch.full((1,), start, dtype=torch.int32, device=device))
        return cls(groups, torch.cat(parts), prefixes)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v (1, T, H, Dh) -> (1, T, H, Dh), attention within each sequence."""
        _, T, H, Dh = q.shape
        if _varlen_ok(q):
            return _varlen_attention(q, k, v, self.cu_seqlens, max(n for _, n in self.groups))
        sizes = [b * n for b, n in self.groups]
        masks = self.prefixes or (None,) * len(self.groups)
        outs = []
        for (b, n), mask, *qkv in zip(self.groups, masks, *(t[0].split(sizes) for t in (q, k, v))):
            o = F.scaled_dot_product_attention(
                *(t.view(b, n, H, Dh).transpose(1, 2) for t in qkv), attn_mask=_key_mask(mask))
            outs.append(o.transpose(1, 2).reshape(b * n, H, Dh))
        return torch.cat(outs)[None]


# (B, M) bool keys that may be attended to, their prefix layout or packed sequences; None: all
KeyValid = Tensor | PrefixKeys | PackedRows | None


def _key_mask(key_valid: KeyValid) -> Tensor | None:
    # (B, M) -> (B, 1, 1, M): broadcast over heads and queries. None keeps SDPA on its unmasked
    # (flash) kernels when nothing is padded.
    if isinstance(key_valid, PrefixKeys):
        key_valid = key_valid.mask
    return None if key_valid is None else key_valid[:, None, None, :]


def _varlen_ok(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0


def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                      longest: int) -> Tensor:
    """q, k, v (B, M, H, Dh) -> (B, M, H, Dh) through flash attention's variable-length kernel
    over the sequences the offsets `cu_seqlens` cut the B * M rows into, none longer than
    `longest` (differentiable; no host sync: the offsets stay on the device, the bound is
    static)."""
    B, M, H, Dh = q.shape
    rows = lambda t: t.reshape(B * M, H, Dh)  # noqa: E731
    out = torch.ops.aten._flash_attention_forward(rows(q), rows(k), rows(v), cu_seqlens,
                                                  cu_seqlens, longest, longest, 0.0, False,
                                                  False)[0]
    return out.view(B, M, H, Dh)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = CastOnceLinear(dim, 3 * dim, bias=qkv_bias)
        self.proj = CastOnceLinear(dim, dim)

    def _out(self, o: Tensor) -> Tensor:
        B, _, K, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, K, -1))  # (B, K, D)

    def forward(self, x: Tensor, rope: Rope, key_valid: KeyValid) -> tuple[Tensor, KV]:
        """Self-attention over the K tokens given; also returns their keys/values for sharing."""
        B, K, _ = x.shape
        qkv = self.qkv(x).view(B, K, 3, self.num_heads, self.head_dim)  # (B, K, 3, H, Dh)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]
        if rope is not None:
            qk = apply_rotary(qk, rope)  # queries and keys in one pass
        if isinstance(key_valid, PackedRows):
            o = key_valid.attend(qk[:, :, 0], qk[:, :, 1], v)  # (1, T, H, Dh)
            return self.proj(o.reshape(B, K, -1)), (qk[:, :, 1].transpose(1, 2), v.transpose(1, 2))
        if isinstance(key_valid, PrefixKeys) and _varlen_ok(qk):
            o = _varlen_attention(qk[:, :, 0], qk[:, :, 1], v, key_valid.cu_seqlens, K)
            k, v = qk[:, :, 1].transpose(1, 2), v.transpose(1, 2)
            return self.proj(o.reshape(B, K, -1)), (k, v)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, K, Dh) each
        v = v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(key_valid))
        return self._out(o), (k, v)

    def attend_to(self, x: Tensor, rope: Rope, kv: KV, key_valid: KeyValid) -> Tensor:
        """Queries from x attend to given keys/values (recursive KV sharing): only the query
        slice of the fused projection runs, so K/V projections are skipped entirely."""
        B, K, D = x.shape
        weight, bias = self.qkv.weights()
        q = F.linear(x, weight[:D], None if bias is None else bias[:D])
        q = q.view(B, K, self.num_heads, self.head_dim)
        if rope is not None:
            q = apply_rotary(q, rope)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), *kv, attn_mask=_key_mask(key_valid))
        return self._out(o)


class FeedForward(nn.Module):
    """fc2(gelu(fc1(x))): timm's `Mlp` with its parameter names, without its two p = 0 dropouts
    and identity norm. Those are three module calls per layer that compute nothing but cost host
    time, and an eager forward on short inputs is bound by the host (benchmarks/README.md)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = CastOnceLinear(dim, hidden)
        self.fc2 = CastOnceLinear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        # None without stochastic depth: no identity module to call twice per layer.
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(
        self,
        x: Tensor,
        rope: Rope = None,
        key_valid: KeyValid = None,
        kv: KV | None = None,
        split: bool = False,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], KV | None]:
        """Returns the new hidden states and the keys/values this call computed (None when it
        attended to the given `kv` instead). split: the hidden states as their two terms, the
        stream after attention and the MLP's output, for a caller that fuses their sum with what
        it does next (MoRBackbone's merge)."""
        h = self.norm1(x)
        if kv is None:
            a, kv_out = self.attn(h, rope, key_valid)
        else:
            a, kv_out = self.attn.attend_to(h, rope, kv, key_valid), None
        if self.drop_path is None:
            x = x + a
            m = self.mlp(self.norm2(x))
        else:
            x = x + self.drop_path(a)
            m = self.drop_path(self.mlp(self.norm2(x)))
        return ((x, m) if split else x + m), kv_out
