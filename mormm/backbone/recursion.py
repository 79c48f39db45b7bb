"""The Mixture-of-Recursions backbone: shared layers applied recursively, a router per step.

Dimension legend:
    B batch, N tokens, K tokens gathered for one step, M tokens still active (compact working
    set), U routing units, D width, P rotary pairs

Data flow of one forward:
    Tokens -> prelude layers (all tokens) -> for each recursion step r:
        router picks units -> gather the K selected tokens (B, K, D) with their positions ->
        run the step's shared layers on that dense tensor only -> merge the gated update
    -> coda layers (all tokens) -> final norm -> BackboneOutput

Tokens that exit are really skipped: each step works on a dense (B, K, D) tensor with K static
(capacity x N), so shapes never depend on data and nothing synchronises with the host. Two loops
implement the steps: `_compact` (expert- and token-choice over unpadded clips) keeps the
still-active tokens gathered between steps and scatters them back once at the end (or, at CUDA
inference, writes each step's rows straight back into the sequence: fused.py); `_masked`
(padding, threshold inference, the analysis baselines) selects with (B, N) masks and scatters
back after every step. Steps that take fewer tokens than their static bound attend over the
taken slots only (PrefixKeys).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from encoders.tokens import Tokens
from mormm.backbone import fused
from mormm.backbone.casts import cast_once
from mormm.backbone.config import BackboneConfig
from mormm.backbone.layers import Block, PrefixKeys
from mormm.backbone.outputs import BackboneOutput, StepTrace
from mormm.backbone.rotary import AxialRotary
from mormm.backbone.routers import Route, Router, sigmoid_gate
from mormm.backbone.sharing import sharing_plan
from mormm.backbone.units import Units, gather_blocks, gather_rows, scatter_blocks


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
        N = tokens.embeddings.shape[1]
        if self.router.unit == "segment":
            if tokens.contiguous_segments and tokens.padding_mask is None:
                U, L = tokens.num_segments, tokens.max_segment_len
                return Units.blocks(U, L, U)
            return Units.segments(
                tokens.segment_ids, tokens.valid, tokens.num_segments, tokens.max_segment_len
            )
        return Units.tokens(tokens.valid, N)

    def forward(self, tokens: Tokens) -> BackboneOutput:
        weights = _linears_cast_once(self, tokens.embeddings)
        if weights is not None:  # the call below sees cast weights and takes the normal path
            return torch.func.functional_call(self, weights, (tokens,))
        if not self.plan.reuses_weights or torch.compiler.is_compiling():
            # vanilla casts each weight once anyway; a compiled graph has its own way (above)
            return self._forward(tokens)
        with cast_once(tokens.embeddings):  # eager inference under autocast (casts.py)
            return self._forward(tokens)

    def _forward(self, tokens: Tokens) -> BackboneOutput:
        x, rope = self.enter(tokens)
        valid = tokens.valid  # (B, N) or None
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        units = self._units(tokens) if self.router is not None else None
        if self.router is None:
            x, traces = self._plain(x, rope, valid)
            count_depth = partial(_count_selected, traces)
        elif self.router.compact(units):
            x, traces, count_depth = self._compact(x, rope, units, losses, stats,
                                                   tokens.embeddings)
        else:
            x, traces = self._masked(x, rope, valid, units, losses, stats)
            count_depth = partial(_count_selected, traces)
        return self.leave(x, rope, valid, traces, count_depth, losses, stats)

    def enter(self, tokens: Tokens) -> tuple[Tensor, Tensor | None]:
        """What the recursion steps start from: the embeddings through the prelude layers, and
        the rotary table (B, N, 2, Dh) in the compute dtype (None without rotary embeddings)."""
        x = tokens.embeddings
        rope = self.rotary(tokens.positions) if self.rotary is not None else None
        if rope is not None:
            # Attention rotates q/k in the compute dtype (autocast's, else the weights'); cast once
            # here rather than in every layer (same numbers, half the bytes gathered and read per
            # layer under bf16).
            autocast = torch.is_autocast_enabled(x.device.type)
            rope = rope.to(torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)
        for i in self.plan.prelude:
            x, _ = self.layers[i](x, rope, tokens.valid)
        return x, rope

    def leave(self, x, rope, valid, traces, count_depth, losses, stats) -> BackboneOutput:
        """The output of sequence x (B, N, D) after the recursion steps: coda layers, final
        norm."""
        for i in self.plan.coda:
            x, _ = self.layers[i](x, rope, valid)
        aux = sum(losses.values()) if losses else x.new_zeros(())
        return BackboneOutput(
            hidden=self.norm(x),
            count_depth=count_depth,
            steps=traces,
            aux_loss=aux,
            losses=losses,
            stats=stats,
            valid=valid,
        )

    def _plain(self, x, rope, valid):
        """Plain recursion: every token takes every step, no gate."""
        B, N, _ = x.shape
        everyone = _all_or(valid, B, N, x.device)
        shared_kv: list = []
        traces = []
        for r, chunk in enumerate(self.plan.steps):
            x = self._run(r, chunk, x, rope, shared_kv, valid, valid)
            traces.append(StepTrace(everyone, None, None))
        return x, traces

    def _compact(self, x, rope, units, losses, stats, given):
        """Routed steps when `router.compact(units)` (expert- or token-choice over unpadded clips,
        per token or per segment): the tokens still active stay gathered between steps as a dense
        working set (B, M, D), so a step's router, top-k and gather read only the M tokens that
        compete for it instead of all N; each level of the working set is scattered back once, at
        the end. With fused merges (fused.py) and every later step's scores coming out of them or
        not needed (token-choice), the working set's rows are written straight into the sequence
        instead and each step reads its rows from there by position: nothing to scatter back.
        Gathered segments are stored whole, one after the other (Units.blocks, as contiguous
        segments are from the start), and move by block index. A step that keeps fewer units than
        its static bound (token-choice) puts the taken ones first and attends over them alone
        (PrefixKeys); its other slots pass through unchanged and compete no further. The same
        function as `_masked`, with fewer bytes and kernels per step (no (B, N) masks and gates, no
        scatter of the whole sequence per step).

        given: the backbone's input embeddings, never written in place."""
        B, N, _ = x.shape
        h, h_rope, where = x, rope, None  # working set, its rotary table, its tokens' positions
        live = None  # (B, M units) the working set's units that took the last step; None: all
        levels: list[tuple[Tensor, Tensor, int]] = []  # (parent working set, its blocks, L)
        chosen: list[tuple[Tensor, Tensor | None]] = []  # per step below N: positions, taken
        everyone_steps = 0
        shared_kv: list = []
        traces: list[StepTrace] = []
        carry = scores = None
        set_units = units  # the working set's units
        fuse = self._fuses(x)
        # Eager: gates into the merges (below) and token-choice's decision and attention
        # offsets into Triton launches (fused_routing.py); compiled, inductor fuses their ops.
        fold = fuse and not torch.compiler.is_compiling()
        # Fused, with every later step's scores fused too or not needed (token-choice decides
        # every step up front): the whole sequence (B, N, D) after the first step, into which
        # each step's merge writes its rows in place; the steps read their rows from it, so no
        # working set needs scattering back at the end.
        stream = None
        # Each step's router weight, where its scores can come out of the previous step's merge.
        R = len(self.plan.steps)
        weights = [self.router.score_weight(j) if fuse and j else None for j in range(R)] + [None]
        for r, chunk in enumerate(self.plan.steps):
            route = self.router.route(r, h, set_units, live, carry, scores, fused=fold)
            nxt = weights[r + 1]
            _accumulate(losses, route.losses)
            stats.update(route.stats)
            # Gates stay per unit (B, U): merges read the kept units' own, traces on demand.
            gate, trace_gate = StepGate.of(route, fold)
            competed, taken, step_units = where, None, set_units
            if route.index is None:  # every token of the working set takes the step
                carry = route.carry
                if where is None:  # the working set is the sequence: the step writes a new one
                    stream = None
                elif stream is not None:  # the working set's rows live in the sequence
                    h, h_rope, _ = _rows_at(stream, rope, where)
                h, scores = self._update(r, chunk, set_units, h, h_rope, shared_kv, None, gate,
                                         fuse, nxt, stream, where)
                if stream is None and fuse and where is None and self.rows_stay_after(r):
                    stream = h  # this forward's own (B, N, D) tensor
            else:
                # The kept units' rows: whole blocks of L rows by unit index (tokens: L = 1), or
                # for segments found by id (the sequence itself), their tokens one by one.
                index, L = set_units.rows_of(route.index)
                carry = self.router.gather_carry(route.carry, route.index)
                live = route.taken  # None: every unit of the index takes the step
                kept = route.index.shape[1]
                if stream is not None:  # straight from the sequence, with their positions
                    h_in, h_rope, where = _rows_at(stream, rope, where, index, L, set_units)
                else:
                    where = _positions(where, index, L, set_units)
                    h_in = gather_blocks(h, index, L)
                    h_rope = None if h_rope is None else gather_blocks(h_rope, index, L)
                    levels.append((h, index, L))
                set_units = set_units.kept(kept)
                keys = None
                if live is not None:
                    taken = set_units.broadcast(live)  # (B, K): the first slots of each row
                    keys = PrefixKeys.of(taken, fold)
                # Slots that did not take the step write back what they read.
                h, scores = self._update(r, chunk, set_units, h_in, h_rope, shared_kv, keys,
                                         gate._replace(index=route.index), fuse, nxt, stream,
                                         where, taken)
            if where is None:
                everyone_steps += 1
            else:
                chosen.append((where, taken))
            traces.append(StepTrace.compact(N, competed, where, route.logits, trace_gate, taken,
                                            step_units.broadcaster()))

        grad = torch.is_grad_enabled() and h.requires_grad
        for parent, index, L in reversed(levels):
            # In place at inference: every parent but the input is this forward's own tensor.
            h = scatter_blocks(parent, index, h, L, inplace=not grad and parent is not given)

        return h, traces, depth_counter(B, N, everyone_steps, chosen, h.device)

    def _masked(self, x, rope, valid, units, losses, stats):
        """Routed steps in sequence space: each step's selection is a (B, N) mask (padding,
        segments, token-choice overflow, threshold inference); the selected tokens are gathered,
        processed and scattered back into x at every step."""
        B, N, _ = x.shape
        active = units.all_valid(B, x.device)
        carry = None
        shared_kv: list = []
        traces: list[StepTrace] = []
        # The merges here stay unfused; token-choice's decision and the padded steps' attention
        # offsets run as one launch each where a fused merge would (fused_routing.py).
        fold = self._fuses(x) and not torch.compiler.is_compiling()
        for r, chunk in enumerate(self.plan.steps):
            route = self.router.route(r, x, units, active, carry, fused=fold)
            carry, active = route.carry, route.selected
            _accumulate(losses, route.losses)
            stats.update(route.stats)
            selected = units.broadcast(route.selected)  # (B, N)
            if valid is not None:
                selected = selected & valid  # a padded token never joins a real segment's step
            gate = units.broadcast(route.gates()).to(x.dtype)  # (B, N)
            # Segments: ranked from the token mask here.
            index, taken = (route.index, route.taken) if units.is_tokens else (None, None)
            x = self._step(r, chunk, x, rope, valid, selected, gate, units.gather_size(route.kept),
                           route.exact, shared_kv, index, taken, fold)
            traces.append(StepTrace(selected, units.broadcast(route.logits), gate))
        return x, traces

    def _run(self, r, chunk, h, rope, shared_kv, key_valid=None, valid=None, split=False):
        """Step r's shared layers on h. key_valid: the keys h's tokens may attend to (None: all of
        them); valid: the sequence's valid tokens, for the keys of recursive KV sharing; split:
        return the last layer's output as its two terms (Block.forward)."""
        for j, i in enumerate(chunk):
            h, _ = self._layer(i, h, rope, key_valid, valid, r, j, shared_kv,
                               split and j == len(chunk) - 1)
        return h

    def rows_stay_after(self, r: int) -> bool:
        """Whether the steps after step r can keep their working set's rows in the sequence
        under fused merges: each one's scores come out of the previous merge or it needs none
        (it routes by its carry alone)."""
        return all(self.router.score_weight(j) is not None or not self.router.reads_hidden(j)
                   for j in range(r + 1, len(self.plan.steps)))

    def _fuses(self, x: Tensor) -> bool:
        """Whether this forward's routed steps end in fused.merge_rows (and, eager, run their
        bookkeeping through fused_routing.py): inference (the kernel has no backward), a
        device it runs on, and no dispatch mode watching the ops (a FLOP or launch counter then
        sees the unfused ops, which do the same work; the kernel would be invisible to it).
        Under torch.compile on CUDA the kernel is traced into the graph as a user Triton kernel:
        inductor fuses the unfused ops too, but its merges also wrote each working set into a
        copy for the scatter back, and per-token routing at the long shapes ran 1-2 % slower
        with them (launch-bound short shapes: from 2 % slower to 4 % faster; per segment: the
        same; benchmarks/results/nvidia-h200-compiled-merge.md)."""
        if not (self.config.fused_merge and not torch.is_grad_enabled()):
            return False
        if torch.compiler.is_compiling():
            return x.is_cuda and fused.triton is not None
        return fused.runs_on(x) and torch._C._len_torch_dispatch_stack() == 0

    def _update(self, r, chunk, units, h, rope, shared_kv, keys, gate: StepGate, fuse, nxt,
                stream=None, where=None, taken=None):
        """Step r's layers on the working set h and its gated update (one gate per unit of
        `units`); rows not `taken` (B, K) keep what they read (None: all took the step). Returns
        the new h and, with `fuse` and the next router's weight `nxt`, its scores (else None).
        With `fuse` the last residual add, the update and the scores run as one kernel, which
        reads the gates as `gate` gives them and writes the rows to positions `where` of
        `stream` if given (and returns the stream); segments found by id (not whole blocks) take
        the unfused ops."""
        split = fuse and units.segment_ids is None
        out = self._run(r, chunk, h, rope, shared_kv, keys, split=split)
        return self.merge_step(units, h, out, gate, nxt, stream, where, taken)

    def merge_step(self, units, h, out, gate: StepGate, nxt=None, stream=None, where=None,
                   taken=None) -> tuple[Tensor, Tensor | None]:
        """The gated update of working set h (one gate per unit of `units`) from its step's
        output `out`, or from its last layer's two terms (Block.forward's split), which end the
        step in the fused kernel (see _update); rows not `taken` keep what they read. Returns
        the new h and the fused kernel's scores for `nxt` (else None)."""
        if isinstance(out, tuple):
            return fused.merge_rows(h, *out, gate.values, self.config.gate_update == "delta", nxt,
                                    stream, where if stream is not None else None, taken,
                                    gate.index, gate.sigmoid_scale)
        new = self._merge_units(units, h, out, gate.materialize(h.dtype))
        return (new if taken is None else torch.where(taken[..., None], new, h)), None

    def _merge(self, inp: Tensor, out: Tensor, gate: Tensor) -> Tensor:
        """The gated update of selected tokens, one fused kernel: inp + g (out - inp) or
        inp + g out (see BackboneConfig.gate_update)."""
        g = gate[..., None]
        if self.config.gate_update == "delta":
            return torch.lerp(inp, out, g)
        return torch.addcmul(inp, g, out)

    def _merge_units(self, units: Units, inp: Tensor, out: Tensor, gate: Tensor) -> Tensor:
        """_merge with one gate per unit of `units` (B, U). Whole segments stored one after the
        other (blocks) take theirs through a (B, U, L, D) view: no gate copied out per token."""
        if units.is_tokens:
            return self._merge(inp, out, gate)
        if units.segment_ids is None:
            split = lambda t: t.unflatten(1, (units.num_units, units.max_len))  # noqa: E731
            return self._merge(split(inp), split(out), gate[..., None]).flatten(1, 2)
        return self._merge(inp, out, units.broadcast(gate))

    def _layer(self, i, h, rope, key_valid, valid, step, slot, shared_kv, split=False):
        """One shared layer of a recursion step, honouring the KV mode."""
        if self.config.kv_mode == "shared" and step > 0:
            # Recursive KV sharing: attend to the first recursion's keys/values of every valid
            # token; only the query projection runs here.
            return self.layers[i](h, rope, valid, kv=shared_kv[slot], split=split)
        h, kv = self.layers[i](h, rope, key_valid, split=split)
        if self.config.kv_mode == "shared" and step == 0:
            shared_kv.append(kv)
        return h, kv

    def _step(self, r, chunk, x, rope, valid, selected, gate, K, exact, shared_kv, index=None,
              taken=None, fused=False):
        """Run recursion step r on the selected tokens and merge the gated update into x.

        exact: every sample selects exactly K tokens (static), so no slot is padding and attention
        needs no mask (SDPA keeps its flash kernels). index: the router's (B, K) token
        indices, when it has them, and taken, which of them take the step (None: read from
        `selected`); otherwise they are ranked from the mask here. fused: the attention offsets
        in one Triton launch (PrefixKeys.of).
        """
        B, N, _ = x.shape
        if K >= N:
            # Nothing to skip statically (e.g. capacity 1): run in place.
            key_valid = valid if exact else selected  # exact at K == N: every token is selected
            new = self._merge(x, self._run(r, chunk, x, rope, shared_kv, key_valid, valid), gate)
            return new if exact else torch.where(selected[..., None], new, x)

        # Gather the K selected tokens into a dense (B, K, D) tensor. Their order is the
        # ranking's, not the sequence's: attention is order-free (rotary tables travel with the
        # tokens) and skipping the sort saves two kernels per step.
        if index is None:  # taken tokens first (sorted), as a router's ranking has them
            index = selected.to(x.dtype).topk(K, dim=-1).indices  # (B, K)
        # Not exact: the first slots of each row are the taken tokens, the rest padding.
        if not exact and taken is None:
            taken = selected.gather(1, index)
        slot_valid = None if exact else PrefixKeys.of(taken, fused)
        h_in = gather_rows(x, index)
        rope_k = None if rope is None else gather_rows(rope, index)
        h = self._run(r, chunk, h_in, rope_k, shared_kv, slot_valid, valid)
        new = self._merge(h_in, h, gate.gather(1, index))
        if slot_valid is not None:  # padding slots write back what they read
            new = torch.where(slot_valid.mask[..., None], new, h_in)
        return x.scatter(1, index[..., None].expand_as(new), new)


class StepGate(NamedTuple):
    """A step's gates as its merge reads them: `values` (B, U), one per unit of the working set
    the step routed, or the router's logits where `sigmoid_scale` is set (the gate is then
    sigmoid_scale * sigmoid(logit), expert-choice's alpha); `index` (B, K) the units kept, or
    None (all). The fused merge reads them as they are, so the host launches no op to compute,
    cast or gather them."""

    values: Tensor
    sigmoid_scale: float | None = None
    index: Tensor | None = None

    @classmethod
    def of(cls, route: Route, fold: bool) -> tuple[StepGate, Tensor | Callable[[], Tensor]]:
        """A route's gates for its merge, and for its step trace (a function where they are
        computed on first read). An eager fused merge (fold) applies the router's sigmoid
        itself where the router left it to its user."""
        if route.gate is None and fold:
            return cls(route.logits, route.sigmoid_scale), route.gates
        gate = cls(route.gates())
        return gate, gate.values

    def materialize(self, dtype: torch.dtype) -> Tensor:
        """The (B, K) gates of the kept units, in `dtype` (the unfused merge's)."""
        g = self.values
        if self.sigmoid_scale is not None:
            g = sigmoid_gate(g, self.sigmoid_scale)
        g = g.to(dtype)
        return g if self.index is None else g.gather(1, self.index)


def _linears_cast_once(module: MoRBackbone, x: Tensor) -> dict[str, Tensor] | None:
    """The layers' fp32 linear weights and biases cast to the autocast dtype, for compiled inference
    under autocast; None otherwise. Autocast casts a linear's weight at each use; eager mode
    caches the cast for the autocast region, a compiled graph does not, and inductor does not
    merge the repeats: each shared weight was cast (one kernel launch each) once per recursion
    (101 casts per forward for 29 weights at 12 effective layers, N_r = 4), which made compiled
    MoR slower than vanilla on short, launch-bound inputs. The cast values are what autocast
    computes, so outputs do not change. Training keeps per-use casts: their gradients then
    accumulate into the fp32 weight in fp32, not first summed in bf16."""
    device = x.device.type
    if not (torch.compiler.is_compiling() and torch.is_autocast_enabled(device)
            and not torch.is_grad_enabled()):
        return None
    dtype = torch.get_autocast_dtype(device)
    # The shared layers' linears only: a linear router scores in fp32 (routers._score), an MLP
    # router's layers run once per forward (autocast casts them once either way).
    weights = {
        f"{name}.{key}": p.to(dtype)
        for name, m in module.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)
        for key, p in m.named_parameters(recurse=False) if p.dtype == torch.float32
    }
    return weights or None


def _rows_at(stream: Tensor, rope: Tensor | None, where: Tensor | None,
             pick: Tensor | None = None, L: int = 1,
             units: Units | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """The rows (B, K, D), rotary tables and positions (B, K) of the tokens at positions `where`
    of the sequence `stream` (fused steps, which keep their working set there); with `pick`,
    of the kept blocks of those tokens (see _positions). Compiled, as a gather that inductor
    fuses into the kernels reading the rows (the first norm, the rotary apply); eager, as one
    launch that also composes the positions."""
    if torch.compiler.is_compiling():
        if pick is not None:
            where = _positions(where, pick, L, units)
        return (gather_rows(stream, where), None if rope is None else gather_rows(rope, where),
                where)
    return fused.gather_rows(stream, where, rope, pick, L)


def _positions(where: Tensor | None, index: Tensor, L: int, units: Units) -> Tensor:
    """The sequence positions (B, K * L) of the blocks `index` (B, K) of L tokens each, kept out
    of a working set whose tokens sit at `where` (B, M) in the sequence (None: the working set
    is the sequence, its units `units`)."""
    if where is None:
        return index if L == 1 else units.token_index(index)
    return gather_blocks(where, index, L)


def depth_counter(B: int, N: int, everyone_steps: int, chosen: list[tuple[Tensor, Tensor | None]],
                  device: torch.device) -> Callable[[], Tensor]:
    """The function that counts a compact forward's recursions per token (B, N) long when its
    depth is first read: `everyone_steps` steps that every token took, and per step below N the
    positions (B, K) of its slots and which of them took it (None: all). It holds the device,
    not a tensor of the forward's: it outlives the forward."""

    def count_depth() -> Tensor:
        depth = torch.full((B, N), everyone_steps, dtype=torch.long, device=device)
        if chosen:
            where = torch.cat([w for w, _ in chosen], 1)
            if all(t is None for _, t in chosen):
                took = torch.ones_like(where)
            else:
                took = torch.cat([torch.ones_like(w, dtype=torch.bool) if t is None else t
                                  for w, t in chosen], 1).long()
            # In place on this new tensor: no copy of it launched first. (A scalar 1 instead
            # of `took` would save one more, but torch.compile rejects more indices than
            # columns.)
            depth.scatter_add_(1, where, took)
        return depth

    return count_depth


def _count_selected(traces: list[StepTrace]) -> Tensor:
    """Recursions per token (B, N) long, from the steps' selections (which never include
    padding, so padding gets depth 0)."""
    return torch.stack([t.selected for t in traces]).sum(0)


def _accumulate(total: dict[str, Tensor], new: dict[str, Tensor]) -> None:
    for k, v in new.items():
        total[k] = total[k] + v if k in total else v


def _all_or(mask: Tensor | None, B: int, N: int, device) -> Tensor:
    return mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=device)
