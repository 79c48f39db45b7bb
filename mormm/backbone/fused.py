"""The end of a routed recursion step as one Triton kernel (inference).

Dimension legend:
    R rows (tokens of a step's working set, flattened over the batch), D width

Unfused, a step ends in three passes over its rows: the last layer's residual add (x1 + mlp),
the gated update (a lerp with the step's input) and the next step's router product, each
reading the fp32 rows again. `merge_rows` does all three in one pass: it reads the step input,
x1 and the MLP output once, writes the updated rows and, given the next router's weight, their
scores. Its arithmetic is the unfused ops' (torch.lerp's two-sided formula, fp32 throughout), so
only the order of the score's sum differs (fp32 rounding). It reads each row's gate where the
router left it (by the kept units' index, as logits when the gate is a scaled sigmoid).
`gather_rows` finds the positions of the next step's kept tokens and reads their rows and rotary
tables back from the sequence, all in one launch. Eager short clips are bound by the host's
launches, so each op folded in here is time saved on them.

The kernels run on CUDA tensors, and on CPU tensors in a process that runs Triton's interpreter
(TRITON_INTERPRET=1 before Triton is imported: slow, for the tests that check it against the
unfused path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with torch's CUDA wheels; without it the unfused path runs
    triton = None

ROWS = 4  # rows per program: D = 384 fp32 -> 4 x 512 lanes, enough bytes in flight per program


# Grid and block sizes in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions in Triton 3.6, which cost the host about 3 us per call outside a kernel (17 calls
# per expert-choice forward).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The least power of 2 >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def runs_on(x: Tensor) -> bool:
    """Whether merge_rows can take x's device."""
    if triton is None:
        return False
    return x.is_cuda or triton.knobs.runtime.interpret


def _merge_rows(inp, x1, mlp, gate, gate_index, weight, out, score, where, taken, R, D, K, N,
                rows_per_gate, G, gate_b, gate_u, scale,
                DELTA: tl.constexpr, SCORE: tl.constexpr, WHERE: tl.constexpr,
                TAKEN: tl.constexpr, PICK: tl.constexpr, SIGMOID: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < D)[None, :]
    at = rows.to(tl.int64)[:, None] * D + cols[None, :]
    dst = at
    if WHERE:  # row k of sample b goes to row where[b, k] of that sample's N rows in `out`
        to = (rows // K).to(tl.int64) * N + tl.load(where + rows, mask=row_ok, other=0)
        dst = to[:, None] * D + cols[None, :]
    h = tl.load(inp + at, mask=ok, other=0.0).to(tl.float32)
    f = (tl.load(x1 + at, mask=ok, other=0.0).to(tl.float32)
         + tl.load(mlp + at, mask=ok, other=0.0).to(tl.float32))
    # Gate of row group `slot` of sample b: gate[b, slot], or gate[b, gate_index[b, slot]].
    b, slot = (rows // K).to(tl.int64), (rows % K) // rows_per_gate
    unit = slot
    if PICK:
        unit = tl.load(gate_index + b * G + slot, mask=row_ok, other=0)
    g = tl.load(gate + b * gate_b + unit * gate_u, mask=row_ok, other=0.0).to(tl.float32)
    if SIGMOID:  # the router's logits: g = scale * sigmoid(logit)
        g = scale * tl.sigmoid(g)
    # The unfused ops apply the gate in the rows' dtype.
    g = g.to(out.dtype.element_ty).to(tl.float32)[:, None]
    if DELTA:  # torch.lerp(h, f, g), its formula for either side of g = 1/2
        d = f - h
        new = tl.where(g < 0.5, h + g * d, f - d * (1.0 - g))
    else:  # h + g f
        new = h + g * f
    if TAKEN:  # slots that did not take the step keep what they read
        new = tl.where(tl.load(taken + rows, mask=row_ok, other=0)[:, None] != 0, new, h)
    new = new.to(out.dtype.element_ty)
    tl.store(out + dst, new, mask=ok)
    if SCORE:  # the next router's product with the rows as stored
        w = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(score + rows, tl.sum(new.to(tl.float32) * w[None, :], axis=1), mask=row_ok)


def _gather_rows(src, where, pick, pos, out, src2, out2, R, F, F2, K, N, M, KP, L,
                 ROWS: tl.constexpr, BLOCK_F: tl.constexpr, PAIR: tl.constexpr,
                 BLOCK_F2: tl.constexpr, PICK: tl.constexpr, WHERE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    b = (rows // K).to(tl.int64)
    if PICK:  # row j of sample b: token j % L of block pick[b, j // L] of the M positions
        j = rows % K
        u = tl.load(pick + b * KP + j // L, mask=row_ok, other=0)
        p = u * L + j % L
        if WHERE:
            p = tl.load(where + b * M + p, mask=row_ok, other=0)
        tl.store(pos + rows, p, mask=row_ok)
    else:
        p = tl.load(where + rows, mask=row_ok, other=0)
    at = b * N + p
    to = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_F)
    ok = row_ok[:, None] & (cols < F)[None, :]
    tl.store(out + to[:, None] * F + cols[None, :],
             tl.load(src + at[:, None] * F + cols[None, :], mask=ok), mask=ok)
    if PAIR:  # a second tensor's rows at the same positions
        cols2 = tl.arange(0, BLOCK_F2)
        ok2 = row_ok[:, None] & (cols2 < F2)[None, :]
        tl.store(out2 + to[:, None] * F2 + cols2[None, :],
                 tl.load(src2 + at[:, None] * F2 + cols2[None, :], mask=ok2), mask=ok2)


if triton is not None:
    _merge_rows = triton.jit(_merge_rows)
    _gather_rows = triton.jit(_gather_rows)


def merge_rows(inp: Tensor, x1: Tensor, mlp: Tensor, gate: Tensor, delta: bool,
               weight: Tensor | None = None, into: Tensor | None = None,
               where: Tensor | None = None, taken: Tensor | None = None,
               gate_index: Tensor | None = None,
               sigmoid: float | None = None) -> tuple[Tensor, Tensor | None]:
    """The gated update of a step's rows from its last layer's two residual terms.

    inp: (B, K, D) the step's input; x1, mlp: (B, K, D) the last layer's stream after attention
    and its MLP output (the layer's output is their sum); gate: (B, G) one gate per K / G
    consecutive rows (per token, or per segment of K / G tokens), applied in inp's dtype;
    gate_index: (B, G) or None: row group g takes gate[b, gate_index[b, g]] of gate (B, U)
    instead (the gates of the units a router kept, read where the router wrote them);
    sigmoid: a scale s where gate holds logits and the gate is s * sigmoid(logit) (an
    expert-choice router's alpha), else None; delta: inp + g (f - inp) if True, else inp + g f, with
    f = x1 + mlp; weight: (D,) or (1, D) the next router's weight, or None.
    into, where: write the rows in place into `into` (B, N, D), row k of sample b to row
    where[b, k] (the sequence positions of the step's tokens), instead of a new (B, K, D).
    taken: (B, K) bool, the rows that took the step; the others keep inp (None: all took it).
    Returns the rows written (`into`, or the new tensor, in inp's dtype) and the updated rows'
    fp32 scores (B, K) (None without weight). Each tensor folded in here is an op less for the
    host to launch per step (eager short clips are bound by the host)."""
    B, K, D = inp.shape
    R = B * K
    # Row-major buffers throughout: the kernel addresses rows as row * D (an input may be a
    # transposed view, e.g. a patch embedding's output; empty_like would copy its strides).
    # The gate is read through its strides: a token-choice router's is a column of its carry.
    inp, x1, mlp = inp.contiguous(), x1.contiguous(), mlp.contiguous()
    G = gate.shape[1] if gate_index is None else gate_index.shape[1]
    if into is None:
        out = torch.empty(B, K, D, dtype=inp.dtype, device=inp.device)
    else:
        if not into.is_contiguous() or (where is None) or where.shape != (B, K):
            raise ValueError("merge_rows: `into` must be a contiguous (B, N, D) tensor and "
                             f"`where` (B, K) = {(B, K)} positions in it")
        out, where = into, where.contiguous()
    score = None if weight is None else torch.empty(B, K, dtype=torch.float32, device=inp.device)
    _merge_rows[(cdiv(R, ROWS),)](
        inp, x1, mlp, gate, out if gate_index is None else gate_index.contiguous(),
        out if weight is None else weight.contiguous(), out,
        out if score is None else score, out if into is None else where,
        out if taken is None else taken.contiguous(), R, D, K, out.shape[1], K // G, G,
        gate.stride(0), gate.stride(1), 1.0 if sigmoid is None else sigmoid,
        DELTA=delta, SCORE=weight is not None, WHERE=into is not None, TAKEN=taken is not None,
        PICK=gate_index is not None, SIGMOID=sigmoid is not None,
        ROWS=ROWS, BLOCK_D=pow2(D),
    )
    return out, score


def gather_rows(src: Tensor, where: Tensor | None, src2: Tensor | None = None,
                pick: Tensor | None = None,
                block_len: int = 1) -> tuple[Tensor, Tensor | None, Tensor]:
    """src (B, N, *F), where (B, K) -> (B, K, *F): units.gather_rows as one row copy per index;
    with src2 (B, N, *F2) its rows at the same positions too, in the same launch (else None).
    pick (B, P): the positions are those of blocks of `block_len` entries of where (B, M)
    instead, block pick[b, p] for rows p * L .. (p + 1) * L - 1 (gather_blocks(where, pick, L);
    where None: of the sequence's own positions 0 .. N - 1), written out as well: a routed
    step's kept tokens, their positions in the sequence, their rows and rotary tables in one
    launch.
    Returns the rows, src2's rows and the positions (where itself without pick).
    torch's gather reads an index per element: for 32 x 1176 fp32 rows of 384 on the H200 it
    took 53.7 us, a row-wise copy (index_select) 33.8 us. A launch costs the lent hosts 27-48 us
    and eager short clips are bound by the host."""
    B, N = src.shape[:2]
    if pick is None:
        if where is None:
            raise ValueError("gather_rows: give the positions `where`, or `pick` blocks of them")
        K, M, KP, pos = where.shape[1], 0, 0, where.contiguous()
    else:
        KP = pick.shape[1]
        K, M = KP * block_len, 0 if where is None else where.shape[1]
        pick, where = pick.contiguous(), None if where is None else where.contiguous()
        pos = torch.empty(B, K, dtype=torch.long, device=src.device)
    src = src.contiguous()
    out = torch.empty(B, K, *src.shape[2:], dtype=src.dtype, device=src.device)
    out2 = None
    if src2 is not None:
        if src2.shape[:2] != (B, N):
            raise ValueError(f"gather_rows: src2 {tuple(src2.shape)} must share src's (B, N) = "
                             f"{(B, N)}")
        src2 = src2.contiguous()
        out2 = torch.empty(B, K, *src2.shape[2:], dtype=src2.dtype, device=src2.device)
    # Row sizes from the shapes (indexing a row to count it would be two ops to dispatch).
    F, F2 = math.prod(src.shape[2:]), 1 if src2 is None else math.prod(src2.shape[2:])
    _gather_rows[(cdiv(B * K, ROWS),)](
        src, where if pick is not None and where is not None else pos,
        pos if pick is None else pick, pos,
        out, out if src2 is None else src2, out if out2 is None else out2, B * K, F, F2, K, N, M,
        KP, block_len, ROWS=ROWS, BLOCK_F=pow2(F), PAIR=src2 is not None,
        BLOCK_F2=pow2(F2), PICK=pick is not None, WHERE=where is not None)
    return out, out2, pos
