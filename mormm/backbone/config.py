"""Backbone configuration: one flat dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from mormm.backbone.sharing import STRATEGIES, validate_depth

KV_MODES = ("recursion", "shared")
GATE_UPDATES = ("delta", "output")


@dataclass
class BackboneConfig:
    """Width, depth and parameter sharing of the recursive transformer.

    dim:            embedding width D.
    num_heads:      attention heads; must divide dim.
    num_layers:     effective depth L (layers a token passes when it takes every recursion).
    num_recursions: N_r, how many times the recursion block may be applied.
    sharing:        "none" (vanilla: L distinct layers), "cycle", "sequence", "middle_cycle" or
                    "middle_sequence" (MoR paper, section 2.1; middle_cycle won there).
    mlp_ratio:      MLP hidden width over dim.
    qkv_bias:       bias in the fused qkv projection (timm ViT default: True).
    rope_axes:      position axes that get rotary embeddings (0 disables RoPE, e.g. when the
                    tokenizer adds learned position embeddings instead); at most 3.
    rope_theta:     RoPE base period.
    kv_mode:        "recursion": tokens active at a step attend only to tokens active at that
                    step; "shared": they attend to keys/values computed at the first recursion for
                    every valid token (MoR section 2.2.2, recursive KV sharing).
    drop_path:      stochastic depth rate of every layer.
    gate_update:    how a router's gate g enters the update of a selected token h:
                    "delta" gives h + g * (f(h) - h) (only the block's change is gated);
                    "output" gives h + g * f(h), as in the official MoR code, where f(h) carries
                    its own residual. Ignored without a router (plain recursion: h <- f(h)).
    fused_merge:    at inference on CUDA, eager or compiled, end each routed step in one
                    Triton kernel (the last residual add, the gated update and the next
                    router's scores; fused.py) instead of three passes over the step's rows.
                    Same numbers up to fp32 rounding of the scores; False keeps the unfused ops.
    """

    dim: int = 192
    num_heads: int = 3
    num_layers: int = 8  # middle_cycle: a unique first and last layer, 2 shared x 3 recursions
    num_recursions: int = 3
    sharing: str = "middle_cycle"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    rope_axes: int = 3
    rope_theta: float = 100.0
    kv_mode: str = "recursion"
    drop_path: float = 0.0
    gate_update: str = "delta"
    fused_merge: bool = True

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.num_heads <= 0:
            raise ValueError(f"dim ({self.dim}) and num_heads ({self.num_heads}) must be positive")
        if self.dim % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide dim={self.dim}; pick num_heads from "
                f"the divisors of dim, e.g. {[h for h in range(1, 17) if self.dim % h == 0]}"
            )
        if self.sharing not in STRATEGIES:
            raise ValueError(f"sharing={self.sharing!r} is unknown; choose one of {STRATEGIES}")
        validate_depth(self.sharing, self.num_layers, self.num_recursions)
        if not 0 <= self.rope_axes <= 3:
            raise ValueError(f"rope_axes={self.rope_axes} must be between 0 and 3")
        if self.rope_axes and (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"head_dim={self.dim // self.num_heads} (dim / num_heads) must be even for rotary "
                f"embeddings (they rotate channel pairs); change dim or num_heads, or set "
                f"rope_axes=0"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive (100 is the default)")
        if self.rope_axes and (self.dim // self.num_heads) // 2 < self.rope_axes:
            raise ValueError(
                f"head_dim={self.dim // self.num_heads} (dim / num_heads) is too small for "
                f"rope_axes={self.rope_axes} (each axis needs at least one pair of channels)"
            )
        if self.kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode={self.kv_mode!r} is unknown; choose one of {KV_MODES}")
        if self.gate_update not in GATE_UPDATES:
            raise ValueError(
                f"gate_update={self.gate_update!r} is unknown; choose one of {GATE_UPDATES}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be positive")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads
