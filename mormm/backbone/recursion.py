"""The Mixture-of-Recursions backbone: shared layers applied recursively, a router per step.

Dimension legend:
    B batch, N tokens, K tokens gathered for one step, U routing units, D width, P rotary pairs

Data flow of one forward:
    Tokens -> prelude layers (all tokens) -> for each recursion step r:
        router picks units -> gather the K selected tokens (B, K, D) with their positions ->
        run the step's shared layers on that dense tensor only -> scatter the gated update back
    -> coda layers (all tokens) -> final norm -> BackboneOutput

Tokens that exit are really skipped: each step works on a dense (B, K, D) tensor with K static
(capacity x N), so shapes never depend on data and nothing synchronises with the host.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from encoders.tokens import Tokens
from mormm.backbone.config import BackboneConfig
from mormm.backbone.layers import Block
from mormm.backbone.outputs import BackboneOutput, StepTrace
from mormm.backbone.rotary import AxialRotary
from mormm.backbone.routers import Router
from mormm.backbone.sharing import sharing_plan
from mormm.backbone.units import Units


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, *F), index (B, K) -> (B, K, *F)."""
    shape = (*index.shape, *x.shape[2:])
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def _init_weights(m: nn.Module) -> None:
    # ViT initialisation (timm): truncated normal linears, zero biases.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class MoRBackbone(nn.Module):
    """Recursive transformer with optional routing.

    config: width, depth, sharing strategy, KV mode (see BackboneConfig).
    router: an ExpertChoiceRouter / TokenChoiceRouter, or None for a plain recursive (or, with
            sharing "none", vanilla) transformer where every token takes every step.
    """

    def __init__(self, config: BackboneConfig, router: Router | None = None) -> None:
        super().__init__()
        self.config = config
        plan = sharing_plan(config.sharing, config.num_layers, config.num_recursions)
        self.plan = plan
        self.layers = nn.ModuleList(
            Block(config.dim, config.num_heads, config.mlp_ratio, config.qkv_bias, config.drop_path)
            for _ in range(plan.num_weights)
        )
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.rotary = (
            AxialRotary(config.head_dim, config.rope_axes, config.rope_theta)
            if config.rope_axes
            else None
        )
        self.apply(_init_weights)
        self.router = router
        if router is not None:
            router.bind(config.dim, config.num_recursions)
            if config.kv_mode == "shared" and router.step_capacity(0) < 1.0:
                raise ValueError(
                    "kv_mode='shared' reuses the keys/values of the first recursion for every "
                    f"token, so the router's first capacity must be 1.0 (got "
                    f"{router.capacities[0]}); set capacities[0] to 1.0 or use kv_mode='recursion'"
                )

    @property
    def dim(self) -> int:
        return self.config.dim

    def _units(self, tokens: Tokens) -> Units:
        B, N, _ = tokens.embeddings.shape
        if self.router.unit == "segment":
            return Units.segments(
                tokens.segment_ids, tokens.valid, tokens.num_segments, tokens.max_segment_len
            )
        return Units.tokens(tokens.valid, B, N, tokens.embeddings.device)

    def forward(self, tokens: Tokens) -> BackboneOutput:
        x = tokens.embeddings
        B, N, _ = x.shape
        valid = tokens.valid  # (B, N) or None
        rope = self.rotary(tokens.positions) if self.rotary is not None else None
        if rope is not None and torch.is_autocast_enabled(x.device.type):
            # Attention rotates q/k in the autocast dtype; cast once here rather than in every
            # layer (same numbers, half the bytes gathered and read per layer).
            rope = rope.to(torch.get_autocast_dtype(x.device.type))

        for i in self.plan.prelude:
            x, _ = self.layers[i](x, rope, valid)

        units = self._units(tokens) if self.router is not None else None
        active = units.all_valid(B, x.device) if units is not None else None
        everyone = _all_or(valid, B, N, x.device) if self.router is None else None
        carry = None
        shared_kv: list = []
        traces: list[StepTrace] = []
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}

        for r, chunk in enumerate(self.plan.steps):
            if self.router is None:
                # Plain recursion: every token takes every step, no gate.
                for j, i in enumerate(chunk):
                    x, _ = self._layer(i, x, rope, valid, valid, r, j, shared_kv)
                traces.append(StepTrace(everyone, None, None))
                continue

            route = self.router.route(r, x, units, active, carry)
            carry, active = route.carry, route.selected
            for k, v in route.losses.items():
                losses[k] = losses[k] + v if k in losses else v
            stats.update(route.stats)
            selected = units.broadcast(route.selected)  # (B, N)
            if valid is not None:
                selected = selected & valid  # a padded token never joins a real segment's step
            gate = units.broadcast(route.gate).to(x.dtype)  # (B, N)
            x = self._step(r, chunk, x, rope, valid, selected, gate, units.gather_size(route.kept),
                           route.exact, shared_kv, route.index)
            traces.append(StepTrace(selected, units.broadcast(route.logits), gate))

        for i in self.plan.coda:
            x, _ = self.layers[i](x, rope, valid)

        aux = sum(losses.values()) if losses else x.new_zeros(())
        # Recursions per token; selections never include padding, so padding gets depth 0.
        depth = torch.stack([t.selected for t in traces]).sum(0)  # (B, N) long
        return BackboneOutput(
            hidden=self.norm(x),
            depth=depth,
            steps=traces,
            aux_loss=aux,
            losses=losses,
            stats=stats,
            valid=valid,
        )

    def _layer(self, i, h, rope, key_valid, valid, step, slot, shared_kv):
        """One shared layer of a recursion step, honouring the KV mode."""
        if self.config.kv_mode == "shared" and step > 0:
            # Recursive KV sharing: attend to the first recursion's keys/values of every valid
            # token; only the query projection runs here.
            return self.layers[i](h, rope, valid, kv=shared_kv[slot])
        h, kv = self.layers[i](h, rope, key_valid)
        if self.config.kv_mode == "shared" and step == 0:
            shared_kv.append(kv)
        return h, kv

    def _step(self, r, chunk, x, rope, valid, selected, gate, K, exact, shared_kv, index=None):
        """Run recursion step r on the selected tokens and merge the gated update into x.

        exact: every sample selects exactly K tokens (static), so no slot is padding and attention
        needs no mask (SDPA keeps its flash kernels). index: the router's (B, K) ascending token
        indices, when it has them; otherwise they are ranked from the mask here.
        """
        B, N, _ = x.shape
        if K >= N:
            # Nothing to skip statically (e.g. capacity 1): run in place.
            h = x
            key_valid = valid if exact else selected  # exact at K == N: every token is selected
            for j, i in enumerate(chunk):
                h, _ = self._layer(i, h, rope, key_valid, valid, r, j, shared_kv)
            update = self._update(h, x, gate)
            return x + (update if exact else torch.where(selected[..., None], update, 0))

        # Gather the K selected tokens into a dense (B, K, D) tensor, in sequence order.
        if index is None:
            index = selected.to(x.dtype).topk(K, dim=-1).indices.sort(dim=-1).values  # (B, K)
        slot_valid = None if exact else selected.gather(1, index)  # (B, K)
        h_in = _gather(x, index)
        rope_k = None if rope is None else _gather(rope, index)
        h = h_in
        for j, i in enumerate(chunk):
            h, _ = self._layer(i, h, rope_k, slot_valid, valid, r, j, shared_kv)
        update = self._update(h, h_in, gate.gather(1, index))
        if slot_valid is not None:
            update = torch.where(slot_valid[..., None], update, 0)
        return x.scatter_add(1, index[..., None].expand_as(update), update)

    def _update(self, out: Tensor, inp: Tensor, gate: Tensor) -> Tensor:
        g = gate[..., None]
        return g * (out - inp) if self.config.gate_update == "delta" else g * out


def _all_or(mask: Tensor | None, B: int, N: int, device) -> Tensor:
    return mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=device)
