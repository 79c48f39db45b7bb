"""Depth-wise batching: consecutive batches at different recursion steps share every call of the
shared layers (the MoR paper's continuous depth-wise batching, for a stream of clips).

Dimension legend:
    B batch, N tokens, K tokens a batch takes into its step, D width,
    T packed rows (the sum of B * K over the batches in flight)

Within one forward a batch cannot run two steps in one call: each step's input is the previous
step's output for the same tokens. A stream of batches can. The batcher holds up to N_r batches,
the newest at step 0, the one before at step 1, and so on; each call routes every batch in flight
and gathers its step input, packs the rows of all of them into one sequence, runs each shared
layer once over it (attention stays within each clip and step: layers.PackedRows) and merges
each batch's update (one fused.merge_rows launch per batch where the forward's merges are fused;
like the forward's, they then write each batch's rows into its sequence, and its steps read
them from there: no working set is kept for a scatter back). A batch leaves after its last step,
N_r - 1 calls after it came in.

Per batch the shared layers then run once instead of N_r times. Eager short clips are bound by
the host's launches, and the layers' are most of them: on the H200 the host issued a call in
0.3-0.5x of the time it took to issue an expert-choice forward (benchmarks/README.md). The outputs
are the forward's (`backbone(tokens)`), up to the rounding of matrix products over more rows.
The price is memory: the batches in flight and the packed step's activations, about 3x an
eager expert-choice forward's inference peak; and latency: a batch's output comes N_r - 1 calls
after it went in.

Inference only, over unpadded clips, for backbones whose every step runs the same shared layers
(sharing "cycle" or "middle_cycle"), with recursion-wise keys and values, without a router, with
expert-choice top-k routing or with token-choice routing (per token or per segment): the
forward's compact loop, whose steps have static shapes, so nothing waits for the device.
Token-choice steps that keep fewer units than their bound keep their padding slots out of
attention as the forward does (PrefixKeys), within the packed call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from encoders.tokens import Tokens
from mormm.backbone.layers import PackedRows, PrefixKeys
from mormm.backbone.outputs import BackboneOutput, StepTrace
from mormm.backbone.recursion import (MoRBackbone, StepGate, _count_selected, _positions,
                                      _rows_at, depth_counter)
from mormm.backbone.units import Units, gather_blocks, scatter_blocks


@dataclass(eq=False)
class _Batch:
    """One batch in flight: its sequence, working set and what its output will need."""

    shape: tuple[int, int]  # (B, N) of the sequence entering the steps
    rope: Tensor | None  # (B, N, 2, Dh)
    units: Units | None  # the working set's units (None without a router)
    h: Tensor  # (B, M, D) working set
    h_rope: Tensor | None
    where: Tensor | None = None  # (B, M) the working set's positions; None: the sequence
    step: int = 0  # the next step it takes
    levels: list = field(default_factory=list)  # (parent, index, L) per gather (no stream)
    # Fused merges with every later step's scores fused or not needed: the sequence (B, N, D)
    # after the first step, into which each merge writes its rows (the forward's stream).
    stream: Tensor | None = None
    chosen: list = field(default_factory=list)  # (positions, taken) per step below N
    everyone_steps: int = 0
    traces: list = field(default_factory=list)
    live: Tensor | None = None  # (B, M) units that took the last step (token-choice); None: all
    carry: object = None  # what the router decided up front (token-choice)
    fold: bool = False  # merges and routing bookkeeping in Triton launches (eager CUDA, fused.py)
    scores: Tensor | None = None  # (B, M) the next router's scores, from the last fused merge
    pending: tuple | None = None  # the step in progress: input, gate, units, taken slots
    given: Tensor | None = None  # x when it is the caller's embeddings: never written in place


class DepthwiseBatcher:
    """Runs `backbone` over a stream of batches, N_r of them in flight (see the module doc).

        batcher = DepthwiseBatcher(backbone.eval())
        with torch.inference_mode():
            for out in batcher.run(batches):  # BackboneOutput per batch, in their order
                ...

    `batcher(tokens)` admits one batch and returns the output of the batch that finished in
    that call (None while the pipeline fills); `flush()` finishes the batches still in flight.
    Batches may differ in size and length; `refusal(tokens)` says why one cannot enter (run
    it through the backbone alone), and `offer(tokens)` admits a batch only where it can: one
    call for a stream that mixes both.
    """

    def __init__(self, backbone: MoRBackbone) -> None:
        plan, config = backbone.plan, backbone.config
        if len(set(plan.steps)) != 1:
            raise ValueError(
                f"DepthwiseBatcher needs every recursion step to run the same shared layers; "
                f"sharing={config.sharing!r} runs {list(plan.steps)}. Use sharing 'cycle' or "
                f"'middle_cycle', or run the backbone batch by batch")
        if config.kv_mode != "recursion":
            raise ValueError(
                f"DepthwiseBatcher supports kv_mode='recursion', not {config.kv_mode!r} (shared "
                f"keys/values tie later steps to the first step's call); run the backbone batch "
                f"by batch")
        self.backbone = backbone
        self._flight: list[_Batch] = []  # newest first: _flight[i] is at step i (while full)
        self._packs: dict = {}  # PackedRows per layout of the batches in flight

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    def __call__(self, tokens: Tokens | None = None) -> BackboneOutput | None:
        """Admit `tokens` (None: none) and run one step of every batch in flight; the output
        of the batch that took its last step, else None. A batch the pipeline cannot take is
        an error (see `offer`)."""
        if tokens is None:
            self._check_mode()
            return self._advance()
        why, out = self.offer(tokens)
        if why is not None:
            raise ValueError(f"DepthwiseBatcher cannot take this batch: {why}; run it through "
                             "the backbone alone (DepthwiseBatcher.offer admits a batch only "
                             "where it can)")
        return out

    def offer(self, tokens: Tokens) -> tuple[str | None, BackboneOutput | None]:
        """`batcher(tokens)` where the pipeline can take the batch: (None, the output of the
        batch that finished in this call or None). Where it cannot: (why, None), the batch not
        admitted and nothing run; run it through the backbone alone. The routing units the
        batch is judged by are the ones it runs with: built once (segments found by id cost
        launches)."""
        self._check_mode()
        why, units = self._judge(tokens)
        if why is not None:
            return why, None
        return None, self._advance(self._enter(tokens, units))

    def _advance(self, batch: _Batch | None = None) -> BackboneOutput | None:
        """One step of every batch in flight, `batch` (just entered) included."""
        if batch is not None:
            self._flight.insert(0, batch)
        if not self._flight:
            return None
        inputs = [self._route(b) for b in self._flight]
        for b, out in zip(self._flight, self._layers(inputs)):
            self._merge(b, out)
        if self._flight[-1].step < len(self.backbone.plan.steps):
            return None
        return self._finish(self._flight.pop())

    def flush(self) -> list[BackboneOutput]:
        """Run the batches in flight to their end; their outputs, oldest first."""
        outs = []
        while self._flight:
            out = self()
            if out is not None:
                outs.append(out)
        return outs

    def run(self, batches: Iterable[Tokens]) -> Iterator[BackboneOutput]:
        """The output of each batch, in order."""
        for tokens in batches:
            out = self(tokens)
            if out is not None:
                yield out
        yield from self.flush()

    def _check_mode(self) -> None:
        if self.backbone.training:
            raise RuntimeError("DepthwiseBatcher runs inference only; call backbone.eval() first")
        if torch.is_grad_enabled():
            raise RuntimeError(
                "DepthwiseBatcher runs inference only; call it under torch.inference_mode() or "
                "torch.no_grad()")

    def refusal(self, tokens: Tokens) -> str | None:
        """Why this batch cannot enter the pipeline (None: it can): the batcher runs the
        forward's compact loop, which takes unpadded clips routed by top-k."""
        return self._judge(tokens)[0]

    def _judge(self, tokens: Tokens) -> tuple[str | None, Units | None]:
        """refusal(tokens) and the routing units it judged by (None without a router or when
        padded)."""
        bb = self.backbone
        if tokens.padding_mask is not None:
            return "its clips are padded (Tokens.padding_mask)", None
        units = None if bb.router is None else bb._units(tokens)
        if units is not None and not bb.router.compact(units):
            if not units.full:  # unpadded, so segments: the last one of each clip is partial
                return (f"its {tokens.embeddings.shape[1]} tokens do not fill its "
                        f"{units.num_units} segments of {units.max_len} (Tokens.num_segments "
                        "x max_segment_len)"), units
            return f"the router's inference={bb.router.inference!r} is not 'topk'", units
        return None, units

    def _enter(self, tokens: Tokens, units: Units | None) -> _Batch:
        """An admitted batch (its units judged by `_judge`) through the prelude layers."""
        bb = self.backbone
        x, rope = bb.enter(tokens)
        given = x if x is tokens.embeddings else None
        return _Batch(x.shape[:2], rope, units, x, rope, fold=bb._fuses(x), given=given)

    def _route(self, b: _Batch) -> tuple[Tensor, Tensor | None, PrefixKeys | None]:
        """Route batch b at its step (the forward's compact loop): its step input, rotary table
        and key padding (token-choice steps that keep fewer than their bound)."""
        router = self.backbone.router
        if router is None:
            b.pending = (b.h, None, None, None)
            return b.h, b.h_rope, None
        r, units = b.step, b.units
        route = router.route(r, b.h, units, b.live, b.carry, b.scores, fused=b.fold)
        b.scores = None
        gate, trace_gate = StepGate.of(route, b.fold)
        competed, taken, keys = b.where, None, None
        if route.index is None:  # every unit of the working set takes the step
            b.carry = route.carry
            if b.where is None:  # the working set is the sequence: the step writes a new one
                b.stream = None
            elif b.stream is not None:  # the working set's rows live in the sequence
                b.h, b.h_rope, _ = _rows_at(b.stream, b.rope, b.where)
            h_in, rope_in = b.h, b.h_rope
        else:
            index, L = units.rows_of(route.index)
            b.carry = router.gather_carry(route.carry, route.index)
            b.live = route.taken
            if b.stream is not None:  # straight from the sequence, with their positions
                h_in, rope_in, b.where = _rows_at(b.stream, b.rope, b.where, index, L, units)
            else:
                b.where = _positions(b.where, index, L, units)
                h_in = gather_blocks(b.h, index, L)
                rope_in = None if b.h_rope is None else gather_blocks(b.h_rope, index, L)
                b.levels.append((b.h, index, L))
            b.units = units.kept(route.index.shape[1])
            gate = gate._replace(index=route.index)
            b.h_rope = rope_in
            if b.live is not None:  # the taken slots first, the rest write back what they read
                taken = b.units.broadcast(b.live)
                keys = PrefixKeys.of(taken, b.fold)
        if b.where is None:
            b.everyone_steps += 1
        else:
            b.chosen.append((b.where, taken))
        b.traces.append(StepTrace.compact(b.shape[1], competed, b.where, route.logits, trace_gate,
                                          taken, units.broadcaster()))
        b.pending = (h_in, gate, b.units, taken)
        return h_in, rope_in, keys

    def _layers(self, inputs: list[tuple[Tensor, Tensor | None, PrefixKeys | None]]
                ) -> list[Tensor | tuple[Tensor, Tensor]]:
        """The shared layers once over the step inputs of all batches, packed into one row; each
        batch's output, or where merges are fused, its two terms (Block.forward's split)."""
        bb = self.backbone
        chunk = bb.plan.steps[0]
        split = any(b.fold for b in self._flight)
        last = len(chunk) - 1
        if len(inputs) == 1:
            h, rope, keys = inputs[0]
            for j, i in enumerate(chunk):
                h, _ = bb.layers[i](h, rope, keys, split=split and j == last)
            return [h]
        groups = tuple((h.shape[0], h.shape[1]) for h, _, _ in inputs)
        prefixes = tuple(keys for _, _, keys in inputs)
        device = inputs[0][0].device
        if any(p is not None for p in prefixes):  # offsets that depend on the routing
            packed = PackedRows.of(groups, device, prefixes)
        else:  # static: one per layout, made once
            packed = self._packs.get((groups, device))
            if packed is None:
                if len(self._packs) >= 64:  # a stream of ever new layouts: keep the cache small
                    self._packs.clear()
                packed = self._packs[groups, device] = PackedRows.of(groups, device)
        x = torch.cat([h.flatten(0, 1) for h, _, _ in inputs])[None]
        rope = (None if inputs[0][1] is None
                else torch.cat([r.flatten(0, 1) for _, r, _ in inputs])[None])
        for j, i in enumerate(chunk):
            x, _ = bb.layers[i](x, rope, packed, split=split and j == last)
        sizes = [b * n for b, n in groups]
        rows = [t[0].split(sizes) for t in (x if split else (x,))]
        return [tuple(r.view(h.shape) for r in terms) if split else terms[0].view(h.shape)
                for terms, (h, _, _) in zip(zip(*rows), inputs)]

    def _merge(self, b: _Batch, out: Tensor | tuple[Tensor, Tensor]) -> None:
        """Batch b's gated update from its step's output, or from its last layer's two terms
        where merges are fused (the forward's merge_step)."""
        bb = self.backbone
        h_in, gate, units, taken = b.pending
        b.pending = None
        b.step += 1
        # Without a router, h <- f(h); batches without fused merges and segments found by id
        # take the unfused merge.
        if isinstance(out, tuple) and (gate is None or not b.fold or units.segment_ids is not None):
            out = out[0] + out[1]
        if gate is None:
            b.h = out
            return
        R = len(bb.plan.steps)
        nxt = bb.router.score_weight(b.step) if isinstance(out, tuple) and b.step < R else None
        b.h, b.scores = bb.merge_step(units, h_in, out, gate, nxt, b.stream, b.where, taken)
        if b.stream is None and b.fold and b.where is None and bb.rows_stay_after(b.step - 1):
            b.stream = b.h  # this batch's own (B, N, D) tensor

    def _finish(self, b: _Batch) -> BackboneOutput:
        bb = self.backbone
        h = b.h
        for parent, index, L in reversed(b.levels):
            # In place: every parent but the caller's embeddings is this batch's own tensor.
            h = scatter_blocks(parent, index, h, L, inplace=parent is not b.given)
        B, N = b.shape
        if bb.router is None:  # as the forward's plain loop reports its steps
            everyone = torch.ones(B, N, dtype=torch.bool, device=h.device)
            traces = [StepTrace(everyone, None, None) for _ in bb.plan.steps]
            count = partial(_count_selected, traces)
        else:
            traces = b.traces
            count = depth_counter(B, N, b.everyone_steps, b.chosen, h.device)
        return bb.leave(h, b.rope, None, traces, count, {}, {})
