"""What the harness times: the token grids of the realistic shapes, the variants (one width and
effective depth, DESIGN.md section 3), and a model and random inputs for each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from encoders.tokens import Tokens
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone, TokenChoiceRouter


@dataclass(frozen=True)
class Shape:
    """A batch of token streams on a row-major grid; the first grid axis is the segment axis
    (video: tubelet time slices, audio: time steps, images: rows)."""

    name: str
    batch: int
    grid: tuple[int, ...]
    note: str = ""

    @property
    def tokens(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


SHAPES = {
    "video": Shape("video", 32, (8, 14, 14), "16 x 224^2 frames, 2x16x16 tubelets"),
    "audio10s": Shape("audio10s", 64, (101, 12), "10 s AST-like, 128 mel bins"),
    "audio1s": Shape("audio1s", 256, (9, 12), "1 s AST-like"),
    "image": Shape("image", 128, (14, 14), "224^2, 16x16 patches"),
}
SMALL_SHAPES = {
    "video": Shape("video", 2, (4, 4, 4), "tiny"),
    "audio10s": Shape("audio10s", 2, (12, 4), "tiny"),
    "audio1s": Shape("audio1s", 2, (3, 4), "tiny"),
    "image": Shape("image", 2, (4, 4), "tiny"),
}


def shape_table(small: bool, batch: int | None = None) -> dict[str, Shape]:
    """The realistic shapes, or the CPU smoke test's tiny ones; `batch` replaces each one's."""
    table = SMALL_SHAPES if small else SHAPES
    if batch is None:
        return table
    return {name: replace(shape, batch=batch) for name, shape in table.items()}


def width(small: bool) -> tuple[int, int]:
    """(dim, heads): DESIGN.md section 3's 384 x 6, or the smoke test's 32 x 2."""
    return (32, 2) if small else (384, 6)


@dataclass(frozen=True)
class Variant:
    name: str
    sharing: str = "cycle"
    router: str | None = None  # "ec" expert-choice, "tc" token-choice; --config: its class
    kv_mode: str = "recursion"
    unit: str = "token"


VARIANTS = {
    v.name: v
    for v in (
        Variant("vanilla", sharing="none"),
        Variant("recursive"),
        Variant("mor_ec", router="ec"),
        Variant("mor_ec_kvshare", router="ec", kv_mode="shared"),
        Variant("mor_ec_segment", router="ec", unit="segment"),
        Variant("mor_tc", router="tc"),
        Variant("mor_tc_segment", router="tc", unit="segment"),
    )
}
CAPACITIES = [1.0, 0.75, 0.5, 0.25]
DEPTH = 12  # effective layers of every variant (DESIGN.md section 3)


def build_model(variant: Variant, dim: int, heads: int, layers: int, recursions: int,
                fused_merge: bool = True) -> nn.Module:
    config = BackboneConfig(
        dim=dim,
        num_heads=heads,
        num_layers=layers,
        num_recursions=recursions,
        sharing=variant.sharing,
        kv_mode=variant.kv_mode,
        fused_merge=fused_merge,
    )
    router = None
    if variant.router == "ec":
        router = ExpertChoiceRouter(CAPACITIES[:recursions], unit=variant.unit)
    elif variant.router == "tc":
        router = TokenChoiceRouter(CAPACITIES[:recursions], unit=variant.unit)
    backbone = MoRBackbone(config, router)
    # Routers start at zero scores (every unit ties; token-choice units would all pick depth 1).
    # A small random spread stands in for a trained router, whose selections and token-choice
    # loads are what the timings should see.
    randomize_router(backbone)
    return _Bench(backbone)


def randomize_router(backbone: MoRBackbone) -> None:
    """Give the router's weights (zero at initialisation) a small random spread, std
    0.1 / sqrt(fan-in), so that selections are decided by scores, not by ties."""
    if backbone.router is not None:
        with torch.no_grad():
            for p in backbone.router.parameters():
                p.normal_(0.0, 0.1 * p.shape[-1] ** -0.5)


class _Bench(nn.Module):
    """Plain-tensor entry point (compiles without a dataclass crossing the graph boundary)."""

    def __init__(self, backbone: MoRBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, emb: Tensor, pos: Tensor, seg: Tensor, num_segments: int, seg_len: int):
        out = self.backbone(self.tokens(emb, pos, seg, num_segments, seg_len))
        return out.hidden, out.aux_loss

    @staticmethod
    def tokens(emb: Tensor, pos: Tensor, seg: Tensor, num_segments: int, seg_len: int) -> Tokens:
        # Grid rows as segments, laid out one after the other as tokenizers do (video time
        # slices, audio windows).
        return Tokens(emb, pos, seg, torch.zeros_like(seg), None, num_segments, seg_len,
                      contiguous_segments=True)


def make_inputs(shape: Shape, dim: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, N = shape.batch, shape.tokens
    emb = torch.randn(B, N, dim, generator=g).to(device)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape.grid]
    pos = torch.cartesian_prod(*axes).reshape(N, len(shape.grid))
    seg = pos[:, 0].long()
    num_segments, seg_len = shape.grid[0], N // shape.grid[0]
    return (
        emb,
        pos.expand(B, N, -1).contiguous().to(device),
        seg.expand(B, N).contiguous().to(device),
        num_segments,
        seg_len,
    )


@dataclass
class Suite:
    """What one harness run times: its shapes and variants, how to build a variant's model (an
    nn.Module called on the inputs, returning (hidden, aux_loss), whose `backbone` and
    `tokens(*inputs)` the depthwise mode reads) and a shape's inputs, and the model's
    description for the result files."""

    shapes: dict[str, Shape]
    variants: dict[str, Variant]
    build: Callable[[Variant], nn.Module]
    inputs: Callable[[Shape, torch.device], tuple]
    model: dict


def builtin_suite(small: bool, batch: int | None, dim: int, heads: int, layers: int,
                  recursions: int, fused_merge: bool) -> Suite:
    """The realistic shapes (or the smoke test's) and every variant of one width and depth."""
    return Suite(
        shapes=shape_table(small, batch),
        variants=VARIANTS,
        build=lambda v: build_model(v, dim, heads, layers, recursions, fused_merge),
        inputs=lambda shape, device: make_inputs(shape, dim, device),
        model={"dim": dim, "heads": heads, "layers": layers, "recursions": recursions,
               "capacities": CAPACITIES[:recursions], "fused_merge": fused_merge},
    )
