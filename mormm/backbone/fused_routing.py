"""Routing bookkeeping as single Triton launches (eager inference): token-choice's up-front
decision, and the flash-varlen offsets of steps with padding slots.

Eager short clips are bound by the host's launches (fused.py), and token-choice spent its host
time beyond expert-choice's on small ops: deciding every unit's depth up front took nine
launches (softmax, biased argmax, the chosen gate, suffix sums of the probabilities, the
eligibility mask, the carry's concatenation), and each step with padding slots (token-choice's
after the first; any router's over padded clips) built its flash-varlen offsets in five more (a
count, a subtraction, a stack, a cumsum, a pad; one H200 host issued them in 160 us). Each
function here computes the same numbers in one launch. Same arithmetic in fp32, except the order
of the suffix sums and the exponential's rounding (last-bit differences).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mormm.backbone.fused import ROWS, cdiv, pow2, triton

if triton is not None:
    import triton.language as tl


def _decide(logits, bias, carry, rows_total, R, alpha,
            ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_R)
    row_ok = rows < rows_total
    col_ok = cols < R
    ok = row_ok[:, None] & col_ok[None, :]
    src = rows.to(tl.int64)[:, None] * R + cols[None, :]
    # Padding columns at -inf (their exp is 0); rows past the end at 0 (never stored).
    x = tl.where(col_ok[None, :], tl.load(logits + src, mask=ok, other=0.0), -float("inf"))
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    z = x + tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.argmax(z, axis=1, tie_break_left=True)  # torch.argmax: the first maximum
    gate = alpha * tl.sum(tl.where(cols[None, :] == choice[:, None], p, 0.0), axis=1)
    reach = tl.cumsum(p, axis=1, reverse=True)  # P(depth >= j + 1)
    priority = tl.where(cols[None, :] <= choice[:, None], reach, -float("inf"))
    dst = rows.to(tl.int64)[:, None] * (2 * R + 1) + cols[None, :]
    tl.store(carry + dst, x, mask=ok)
    tl.store(carry + dst + R, priority, mask=ok)
    tl.store(carry + rows.to(tl.int64) * (2 * R + 1) + 2 * R, gate, mask=row_ok)


def _prefix_offsets(mask, cu, B, M, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK)  # a whole row: M is a step's token count
    n = tl.sum(tl.load(mask + b.to(tl.int64) * M + cols, mask=cols < M, other=0).to(tl.int32))
    tl.store(cu + 2 * b, b * M)
    tl.store(cu + 2 * b + 1, b * M + n)
    tl.store(cu + 2 * B, B * M, mask=b == B - 1)


if triton is not None:
    _decide = triton.jit(_decide)
    _prefix_offsets = triton.jit(_prefix_offsets)


def decide(logits: Tensor, bias: Tensor, alpha: float) -> Tensor:
    """Token-choice's up-front decision at inference: logits (B, U, R) fp32 -> the carry
    (B, U, 2R + 1) of TokenChoiceRouter._decide: the logits; per step j the priority
    P(depth >= j + 1), -inf past the unit's choice argmax(logits + bias); the gate alpha *
    P(choice)."""
    B, U, R = logits.shape
    carry = torch.empty(B, U, 2 * R + 1, dtype=torch.float32, device=logits.device)
    _decide[(cdiv(B * U, ROWS),)](logits.float().contiguous(), bias, carry, B * U, R, alpha,
                                  ROWS=ROWS, BLOCK_R=pow2(R))
    return carry


def prefix_offsets(mask: Tensor) -> Tensor:
    """mask (B, M) bool, each row's True slots first -> the (2B + 1,) int32 offsets of its rows
    as 2B sequences in the flattened B * M slots: row b's n_b taken slots from b * M, its padding
    from b * M + n_b (layers.PrefixKeys)."""
    B, M = mask.shape
    cu = torch.empty(2 * B + 1, dtype=torch.int32, device=mask.device)
    _prefix_offsets[(B,)](mask.contiguous(), cu, B, M, BLOCK=pow2(M))
    return cu
