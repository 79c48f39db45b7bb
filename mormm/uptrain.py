"""Uptraining: initialise a recursive backbone from a trained vanilla stack.

The MoR authors recommend uptraining as the cheap adoption path; their code offers four ways to
fill the shared layers from L_src source layers (Bae et al., Relaxed Recursive Transformers):

    stepwise  evenly spaced source layers (e.g. 0, 4, 8 for 12 -> 3 shared layers)
    average   the mean of the source layers that the shared layer stands in for
    lower     the lowest source layers of the shared span
    upper     the highest source layers of the shared span

Unique first/last layers (middle_* strategies) take the first/last source layer. Sources are a
mormm checkpoint of a vanilla model (keys `model.backbone.layers.{i}.*`, also its tokenizer,
pooling and head where shapes match) or a timm ViT state dict (keys `blocks.{i}.*`, `norm.*`):
both use timm's Block parameter names, so layers copy without renaming.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mormm.backbone import MoRBackbone, layer_schedule

METHODS = ("stepwise", "average", "lower", "upper")
SOURCES = ("mormm", "timm")


@dataclass
class UptrainInit:
    """Where to take initial weights from (a field of the LightningModule's config).

    path:   a mormm .ckpt (source "mormm") or a torch-saved timm ViT state dict (source "timm").
    method: one of stepwise / average / lower / upper.
    """

    path: str
    method: str = "stepwise"
    source: str = "mormm"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"init_from.method={self.method!r} is unknown; choose one of {METHODS}")
        if self.source not in SOURCES:
            raise ValueError(f"init_from.source={self.source!r} is unknown; choose one of {SOURCES}")


def source_layer_map(
    strategy: str, num_layers: int, num_recursions: int, num_source: int, method: str
) -> dict[int, list[int]]:
    """Target weight index -> the source layers it is built from (averaged if several)."""
    schedule = layer_schedule(strategy, num_layers, num_recursions)
    if num_source < 1:
        raise ValueError("the source has no transformer layers")

    def src(e: int) -> int:  # effective target layer -> source layer, spread over the source depth
        return round(e * (num_source - 1) / max(1, num_layers - 1))

    middle = strategy.startswith("middle_")
    span = list(range(1, num_layers - 1)) if middle else list(range(num_layers))
    shared = sorted({schedule[e] for e in span}, key=lambda w: schedule.index(w))  # first use order
    s = len(shared)
    out: dict[int, list[int]] = {}
    if middle:
        out[schedule[0]] = [src(0)]
        out[schedule[-1]] = [src(num_layers - 1)]
    for j, w in enumerate(shared):
        if method == "average":
            out[w] = sorted({src(e) for e in span if schedule[e] == w})
        elif method == "stepwise":
            out[w] = [src(span[j * len(span) // s])]
        elif method == "lower":
            out[w] = [src(span[j])]
        else:  # upper
            out[w] = [src(span[len(span) - s + j])]
    return out


_PATTERNS = {"mormm": re.compile(r"^model\.backbone\.layers\.(\d+)\.(.+)$"),
             "timm": re.compile(r"^blocks\.(\d+)\.(.+)$")}
_FINAL_NORM = {"mormm": "model.backbone.norm.", "timm": "norm."}


def load_source_state(init: UptrainInit) -> dict[str, Tensor]:
    path = Path(init.path)
    if not path.is_file():
        raise ValueError(f"init_from.path={init.path!r} does not exist; point it at a .ckpt or state dict")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if init.source == "mormm":
        if "state_dict" not in state:
            raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict'); use source: timm for a plain state dict")
        state = state["state_dict"]
    elif "state_dict" in state or "model" in state:
        state = state.get("state_dict", state.get("model"))
    return state


def uptrain(model: nn.Module, backbone: MoRBackbone, init: UptrainInit) -> dict[int, list[int]]:
    """Copy source layers into `backbone` (and, from a mormm checkpoint, every other tensor of
    `model` whose name and shape match). Returns the weight -> source layers map used."""
    state = load_source_state(init)
    pattern = _PATTERNS[init.source]
    layers: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        raise ValueError(f"{init.path}: no transformer layers found (expected keys like {pattern.pattern})")
    cfg = backbone.config
    mapping = source_layer_map(cfg.sharing, cfg.num_layers, cfg.num_recursions, len(layers), init.method)
    for w, sources in mapping.items():
        merged = {k: torch.stack([layers[i][k].float() for i in sources]).mean(0) for k in layers[sources[0]]}
        try:
            backbone.layers[w].load_state_dict(merged)
        except RuntimeError as e:
            raise ValueError(
                f"{init.path}: source layer {sources} does not fit backbone layer {w} "
                f"(different width or heads?): {e}"
            ) from None
    prefix = _FINAL_NORM[init.source]
    norm = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if norm:
        backbone.norm.load_state_dict(norm)
    if init.source == "mormm":
        _copy_matching(model, state, skip=("model.backbone.",))
    return mapping


def _copy_matching(model: nn.Module, state: dict[str, Tensor], skip: tuple[str, ...]) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith(skip) or not key.startswith("model."):
            continue
        name = key[len("model."):]
        if name in own and own[name].shape == value.shape:
            own[name].copy_(value)
