"""`mormm bench --config FILE`: a training config's own backbone against vanilla and plain
recursion of its width and effective depth, on a batch of its own data.

The model and data come from the same YAML and overrides as `mormm fit` (LightningCLI's parser,
as `mormm analyze` does). One batch of `--split` (a split of the dataset, or a media file or
folder, read as `mormm predict` reads it) goes through the config's tokenizer and pooling's
`prepare` once, in eval mode; the harness then times the backbones on those tokens, so the token
count, the segments the router decides on, the rotary axes and any padding are the config's. The
tokenizer and head cost every variant the same and are not timed.

Variants: "vanilla" (the config's BackboneConfig with sharing "none": as many distinct layers as
its effective depth, no router), "recursive" (its sharing, no router) and the config's own
backbone, named after the config file; a config that is itself vanilla or plain recursion
times only what it is and the baselines it needs.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from encoders.tokens import Tokens
from mormm.backbone import MoRBackbone
from mormm.bench.models import Shape, Suite, Variant, randomize_router
from mormm.data.datamodule import SPLITS


class TokensBench(nn.Module):
    """A backbone called on a batch's token tensors (the harness's plain-tensor entry point, so
    compiled graphs take no dataclass): the statics of the batch's Tokens are kept here."""

    def __init__(self, backbone: MoRBackbone, like: Tokens) -> None:
        super().__init__()
        self.backbone = backbone
        self.statics = dict(num_segments=like.num_segments, max_segment_len=like.max_segment_len,
                            axes=like.axes, contiguous_segments=like.contiguous_segments)

    def forward(self, emb: Tensor, pos: Tensor, seg: Tensor, mod: Tensor, pad: Tensor | None):
        out = self.backbone(self.tokens(emb, pos, seg, mod, pad))
        return out.hidden, out.aux_loss

    def tokens(self, emb: Tensor, pos: Tensor, seg: Tensor, mod: Tensor,
               pad: Tensor | None) -> Tokens:
        return Tokens(emb, pos, seg, mod, pad, **self.statics)


def config_suite(configs: list[str], overrides: list[str], split: str, fused_merge: bool,
                 device: torch.device) -> Suite:
    """The suite of one config (see the module doc). Raises ValueError naming the config, split
    or option at fault."""
    module, datamodule = _load(configs, overrides, split)
    batch = next(iter(datamodule.predict_dataloader()), None)
    if batch is None:
        raise ValueError(f"--split {split}: no clip of {configs[-1]}'s data could be read there "
                         f"({datamodule.skipped.get('predict', 0)} skipped); give a split or "
                         "media path that holds readable clips")
    module.to(device).eval()
    with torch.no_grad():
        tokens = module.model.prepare({k: v.to(device) if isinstance(v, Tensor) else v
                                       for k, v in batch.items()})
    own = module.backbone
    config = replace(own.config, fused_merge=fused_merge)
    name = Path(configs[-1]).stem
    router = own.router
    # One pass through as many distinct layers as the config's effective depth.
    builders = {"vanilla": lambda: MoRBackbone(replace(config, sharing="none", num_recursions=1,
                                                       kv_mode="recursion"))}
    variants = {"vanilla": Variant("vanilla", sharing="none")}
    if config.sharing != "none":
        builders["recursive"] = lambda: MoRBackbone(config)
        variants["recursive"] = Variant("recursive", sharing=config.sharing,
                                        kv_mode=config.kv_mode)
    if router is not None:
        def build_own() -> MoRBackbone:
            bb = copy.deepcopy(own)
            bb.config = config
            randomize_router(bb)  # routers start at zero scores: every unit would tie
            return bb

        builders[name] = build_own
        variants[name] = Variant(name, sharing=config.sharing, router=type(router).__name__,
                                 kv_mode=config.kv_mode, unit=router.unit)

    B, N = tokens.embeddings.shape[:2]
    padded = tokens.padding_mask
    note = f"{', '.join(configs)}, the first batch of {split}"
    if padded is not None:
        note += f", {padded.float().mean().item():.0%} padding"
    shape = Shape(name, B, (N,), note)
    inputs = (tokens.embeddings, tokens.positions, tokens.segment_ids, tokens.modality_ids,
              tokens.padding_mask)
    return Suite(
        shapes={name: shape},
        variants=variants,
        build=lambda v: TokensBench(builders[v.name](), tokens),
        inputs=lambda s, d: tuple(t.to(d) if isinstance(t, Tensor) else t for t in inputs),
        model={"config": list(configs), "dim": config.dim, "heads": config.num_heads,
               "layers": config.num_layers, "recursions": config.num_recursions,
               "sharing": config.sharing, "kv_mode": config.kv_mode,
               "router": None if router is None else type(router).__name__,
               "unit": None if router is None else router.unit,
               "capacities": None if router is None else list(router.capacities),
               "fused_merge": fused_merge},
    )


def _load(configs: list[str], overrides: list[str], split: str):
    """The config's MoRModule (fresh weights) and ShardDataModule, reading `split` as predict
    does."""
    from mormm.cli import model_and_data

    for c in configs:
        if not Path(c).is_file():
            raise FileNotFoundError(f"--config {c}: no such file")
    if split not in SPLITS and not Path(split).expanduser().exists():
        raise ValueError(f"--split {split}: neither a split of the dataset ({', '.join(SPLITS)}) "
                         "nor an existing media file or folder")
    # One batch is read: no worker processes unless the overrides ask for them.
    return model_and_data(configs, ["--data.num_workers", "0", *overrides,
                                    "--data.predict_from", split])
