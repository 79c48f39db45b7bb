"""The fused end of a routed step (mormm/backbone/fused.py) and the routing bookkeeping kernels
(fused_routing.py) compute what the unfused ops do.

On a GPU the tests run the compiled kernel; without one, Triton's interpreter runs the same
program (tests/conftest.py). The CUDA-only tests at the end check the compiled kernel under
bf16 autocast and inside torch.compile's graphs.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import on_device, random_tokens, randomize_router
from mormm.backbone import (
    BackboneConfig,
    ExpertChoiceRouter,
    MoRBackbone,
    TokenChoiceRouter,
    compile_options,
    inference_config,
)
from mormm.backbone import fused, fused_routing, recursion, routers, units
from mormm.backbone.layers import PrefixKeys

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Skipped only without Triton: with it, a CPU run without the interpreter (conftest) fails
# loudly instead of skipping.
needs_kernel = pytest.mark.skipif(fused.triton is None, reason="needs Triton")


@needs_kernel
@pytest.mark.parametrize("delta", [True, False])
@pytest.mark.parametrize("per", [1, 3])  # one gate per row (tokens), per 3 rows (segments)
@pytest.mark.parametrize("mlp_dtype", [torch.float32, torch.bfloat16])
def test_merge_rows_matches_the_unfused_ops(delta, per, mlp_dtype):
    g = torch.Generator().manual_seed(0)
    B, K, D = 3, 9, 24  # 27 rows: not a multiple of the rows per program; D not a power of 2
    inp, x1 = torch.randn(B, K, D, generator=g), torch.randn(B, K, D, generator=g)
    mlp = torch.randn(B, K, D, generator=g).to(mlp_dtype)
    # Gates on both sides of 1/2, where torch.lerp switches formula.
    gate = torch.rand(B, K // per, generator=g)
    weight = torch.randn(D, generator=g)
    inp, x1, mlp, gate, weight = (t.to(DEVICE) for t in (inp, x1, mlp, gate, weight))

    out, score = fused.merge_rows(inp, x1, mlp, gate, delta, weight)
    f = x1 + mlp
    g_rows = gate.repeat_interleave(per, 1)[..., None]
    ref = torch.lerp(inp, f, g_rows) if delta else torch.addcmul(inp, g_rows, f)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(score, ref @ weight, rtol=1e-5, atol=1e-5)
    out2, none = fused.merge_rows(inp, x1, mlp, gate, delta)
    assert none is None and torch.equal(out2, out)
    taken = torch.rand(B, K, generator=g).to(DEVICE) < 0.5
    out4, _ = fused.merge_rows(inp, x1, mlp, gate, delta, taken=taken)
    assert torch.equal(out4, torch.where(taken[..., None], out, inp))
    # A transposed view (a patch embedding's output often is one) reads as what it shows.
    out3, _ = fused.merge_rows(inp.transpose(1, 2).contiguous().transpose(1, 2), x1, mlp, gate,
                               delta)
    assert torch.equal(out3, out)


@needs_kernel
def test_merge_rows_into_the_sequence_and_gather_rows():
    """Rows written in place at their positions, the rest of the sequence untouched; gathers of
    fp32 hidden rows and bf16 rotary tables (B, N, 2, P) equal units.gather_rows."""
    g = torch.Generator().manual_seed(1)
    B, N, K, D = 2, 10, 4, 24
    seq = torch.randn(B, N, D, generator=g).to(DEVICE)
    where = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)]).to(DEVICE)
    inp, x1, mlp = (torch.randn(B, K, D, generator=g).to(DEVICE) for _ in range(3))
    gate = torch.rand(B, K, generator=g).to(DEVICE)
    weight = torch.randn(D, generator=g).to(DEVICE)
    rows, score = fused.merge_rows(inp, x1, mlp, gate, True, weight)
    expected = seq.scatter(1, where[..., None].expand(B, K, D), rows)
    out, score2 = fused.merge_rows(inp, x1, mlp, gate, True, weight, into=seq, where=where)
    assert out is seq and torch.equal(seq, expected) and torch.equal(score2, score)

    rows, none, pos = fused.gather_rows(seq, where)
    assert none is None and torch.equal(rows, units.gather_rows(seq, where))
    rope = torch.randn(B, N, 2, 8, generator=g).to(DEVICE, torch.bfloat16)
    # Both at once, as a routed step reads its rows and their rotary tables.
    rows, rope_rows, _ = fused.gather_rows(seq, where, rope)
    assert torch.equal(rows, units.gather_rows(seq, where))
    assert torch.equal(rope_rows, units.gather_rows(rope, where))
    with pytest.raises(ValueError, match="must share src's"):
        fused.gather_rows(seq, where, rope[:, :-1])


@needs_kernel
@pytest.mark.parametrize("per", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_rows_reads_kept_gates_and_applies_the_sigmoid(per, dtype):
    """Gates read by index from a (B, U) tensor, through its strides (a column of a carry), or
    computed from logits as scale * sigmoid, give what the kernel gives for the gates computed,
    cast to the rows' dtype and gathered by the unfused ops (test_merge_rows_matches_the_unfused_
    ops checks that against the unfused update)."""
    g = torch.Generator().manual_seed(2)
    B, U, G, D = 2, 7, 4, 24
    K = G * per
    inp, x1, mlp = (torch.randn(B, K, D, generator=g).to(DEVICE, dtype) for _ in range(3))
    carry = torch.randn(B, U, 5, generator=g).to(DEVICE)
    logits = carry[..., 3]  # strided, as token-choice's gate column is
    index = torch.stack([torch.randperm(U, generator=g)[:G] for _ in range(B)]).to(DEVICE)
    for gate, sigmoid in ((logits, None), (logits, 0.1), (logits.contiguous(), 0.7)):
        values = gate if sigmoid is None else sigmoid * torch.sigmoid(gate)
        rows = values.to(dtype).gather(1, index)
        ref, _ = fused.merge_rows(inp, x1, mlp, rows, True)
        out, _ = fused.merge_rows(inp, x1, mlp, gate, True, gate_index=index, sigmoid=sigmoid)
        if sigmoid is None and (dtype == torch.float32 or DEVICE.type == "cuda"):
            assert torch.equal(out, ref)  # the same values, read another way
        else:  # Triton's sigmoid and torch's may differ in the last bit; Triton's interpreter
            # rounds fp32 to bf16 toward zero, compiled kernels to nearest as torch does (one
            # bf16 step of a gate: up to 2e-2 here); a wrong gate would be off by about 1
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@needs_kernel
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("composed", [False, True])
def test_gather_rows_composes_the_kept_positions(L, composed):
    """With `pick`, the rows of the kept blocks of a working set whose tokens sit at `where`
    in the sequence (None: the sequence itself), and their positions, as gather_blocks finds
    them."""
    g = torch.Generator().manual_seed(3)
    B, N, D, M, P = 2, 30, 8, 18, 4  # working set: M = 6 blocks of 3 tokens (or 18 tokens)
    seq = torch.randn(B, N, D, generator=g).to(DEVICE)
    rope = torch.randn(B, N, 2, 4, generator=g).to(DEVICE, torch.bfloat16)
    where = (torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(B)]).to(DEVICE)
             if composed else None)
    blocks = M // L if composed else N // L
    pick = torch.stack([torch.randperm(blocks, generator=g)[:P] for _ in range(B)]).to(DEVICE)
    base = where if composed else torch.arange(N, device=DEVICE).expand(B, N)
    expected = units.gather_blocks(base, pick, L)
    rows, rope_rows, pos = fused.gather_rows(seq, where, rope, pick, L)
    assert torch.equal(pos, expected)
    assert torch.equal(rows, units.gather_rows(seq, expected))
    assert torch.equal(rope_rows, units.gather_rows(rope, expected))
    with pytest.raises(ValueError, match="give the positions"):
        fused.gather_rows(seq, None)


def _pair(router_cls, unit="token", caps=(1.0, 0.75, 0.5, 0.25), **cfg):
    config = BackboneConfig(dim=32, num_heads=2, num_layers=8, num_recursions=4, sharing="cycle",
                            **cfg)
    caps = list(caps)
    torch.manual_seed(0)
    on = MoRBackbone(config, router_cls(caps, unit=unit)).eval()
    randomize_router(on)
    off = MoRBackbone(dataclasses.replace(config, fused_merge=False), router_cls(caps, unit=unit))
    off.load_state_dict(on.state_dict())
    return on.to(DEVICE), off.eval().to(DEVICE)


def _spy(monkeypatch, folded=None):
    """Record whether each fused merge computed scores; into `folded`, whether it read the
    kept units' gates by index and applied the router's sigmoid itself."""
    calls = []
    merge = fused.merge_rows

    def spy(inp, x1, mlp, gate, delta, weight=None, into=None, where=None, taken=None,
            gate_index=None, sigmoid=None):
        calls.append(weight is not None)
        if folded is not None:
            folded.append((gate_index is not None, sigmoid is not None))
        return merge(inp, x1, mlp, gate, delta, weight, into, where, taken, gate_index, sigmoid)

    monkeypatch.setattr(fused, "merge_rows", spy)
    return calls


@needs_kernel
@pytest.mark.parametrize("router_cls, segments, cfg, scored, scatters", [
    # Expert-choice: every later step's scores come from the kernel, which writes each step's
    # rows straight into the sequence: nothing is scattered back at the end.
    (ExpertChoiceRouter, None, {}, [True, True, True, False], 0),
    # Contiguous segments of 4 tokens: whole blocks at every step, one gate per 4 rows.
    (ExpertChoiceRouter, "blocks", {}, [True, True, True, False], 0),
    # Segments found by id: the first step (over the sequence) takes the unfused ops, the later
    # ones (the gathered blocks) the kernel.
    (ExpertChoiceRouter, "ids", {}, [True, True, False], 0),
    (ExpertChoiceRouter, None, {"kv_mode": "shared"}, [True, True, True, False], 0),
    (ExpertChoiceRouter, None, {"gate_update": "output"}, [True, True, True, False], 0),
    # A step that keeps all the last one kept (no top-k) reads and writes the same rows.
    (ExpertChoiceRouter, None, {"caps": (1.0, 0.5, 0.5, 0.25)}, [True, True, True, False], 0),
    # Two steps for everyone: the second writes a new sequence, the later ones read from it.
    (ExpertChoiceRouter, None, {"caps": (1.0, 1.0, 0.5, 0.25)}, [True, True, True, False], 0),
    (TokenChoiceRouter, None, {"caps": (1.0, 1.0, 0.5, 0.25)}, [False] * 4, 0),
    # An MLP router scores the rows itself: merges fused, no scores, working sets scattered back.
    (partial(ExpertChoiceRouter, mlp_hidden=16), None, {}, [False] * 4, 3),
    # Token-choice: its router decides every step up front, so no scores are fused or needed:
    # its rows go straight into the sequence too. The steps after the first keep padding slots,
    # which the kernel writes back as they were.
    (TokenChoiceRouter, None, {}, [False] * 4, 0),
    (TokenChoiceRouter, "blocks", {}, [False] * 4, 0),
    (TokenChoiceRouter, "ids", {}, [False] * 3, 0),
])
def test_fused_forward_equals_unfused(monkeypatch, router_cls, segments, cfg, scored, scatters):
    """Same hidden states, depths and step traces as the unfused ops; the kernel really ran, and
    handed its scores to every later expert-choice step."""
    on, off = _pair(router_cls, "token" if segments is None else "segment", **cfg)
    tokens = on_device(random_tokens(2, 24, 32, segments=None if segments is None else 4),
                       DEVICE)
    if segments == "blocks":
        tokens = tokens.replace(contiguous_segments=True)
    folded = []
    calls = _spy(monkeypatch, folded)
    scattered = []
    scatter = recursion.scatter_blocks
    monkeypatch.setattr(recursion, "scatter_blocks",
                        lambda *a, **k: scattered.append(1) or scatter(*a, **k))
    with torch.no_grad():
        a = on(tokens)
        assert calls == scored and len(scattered) == scatters
        # Expert-choice's sigmoid gates are computed in the kernel; token-choice's come decided.
        expert = router_cls is not TokenChoiceRouter
        assert [sigmoid for _, sigmoid in folded] == [expert] * len(calls)
        b = off(tokens)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.depth, b.depth)
    for sa, sb in zip(a.steps, b.steps):
        assert torch.equal(sa.selected, sb.selected)
        torch.testing.assert_close(sa.logits, sb.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sa.gate, sb.gate, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_fused_merge_only_where_it_applies(monkeypatch):
    """Not in training (no backward), not when switched off, not under a FLOP or launch counter
    (the kernel would be invisible to it), not over padded clips (masked loop). Where it runs,
    each later step reads its rows and their rotary tables back in one launch."""
    on, off = _pair(ExpertChoiceRouter)
    folded = []
    calls = _spy(monkeypatch, folded)
    tokens = on_device(random_tokens(2, 24, 32), DEVICE)
    on(tokens)  # grad enabled
    with torch.no_grad():
        off(tokens)
        with FlopCounterMode(display=False):
            on(tokens)
        on(on_device(random_tokens(2, 24, 32, lengths=[24, 17]), DEVICE))
    assert calls == []
    gathers = []
    gather = fused.gather_rows
    monkeypatch.setattr(fused, "gather_rows", lambda src, where, src2=None, pick=None, L=1: (
        gathers.append((src2 is not None, pick is not None)) or gather(src, where, src2, pick, L)))
    with torch.no_grad():
        on(tokens)
    assert len(calls) == 4
    # Steps 2-4 read their rows back from the sequence, rotary tables and the kept tokens'
    # positions in the same launch; their merges read the kept tokens' logits by index.
    assert gathers == [(True, True)] * 3
    assert folded == [(False, True)] + [(True, True)] * 3


@needs_kernel
@pytest.mark.parametrize("R", [3, 4])
def test_decide_kernel_matches_token_choice_decision(monkeypatch, R):
    """fused_routing.decide gives TokenChoiceRouter._decide's carry: logits, priorities (-inf
    past each unit's choice), gates; ties of logits + bias go to the first depth, as in
    torch.argmax. In training the router keeps its ops (the balancing needs them)."""
    router = TokenChoiceRouter([1.0, 0.75, 0.5, 0.25][:R], alpha=0.7)
    router.bind(8, R)
    router = router.to(DEVICE).eval()
    B, U = 2, 11  # 22 rows: not a multiple of the rows per program
    logits = torch.randn(B, U, R, generator=torch.Generator().manual_seed(0)) * 3
    bias = torch.tensor([0.5, 0.0, 0.25, -0.5][:R])
    logits[0, 0] = torch.tensor([0.5, 1.0, 0.75, 1.5][:R])  # logits + bias: a three-way tie
    logits[0, 1] = torch.tensor([0.0, 1.5, 1.25, 0.0][:R])  # depths 2 and 3 tie, above depth 1
    logits, bias = logits.to(DEVICE), bias.to(DEVICE)
    router.depth_bias.copy_(bias)
    monkeypatch.setattr(routers, "_score", lambda proj, hidden: logits)
    hidden, tokens = torch.zeros(B, U, 8, device=DEVICE), units.Units.tokens(None, U)
    ref, _, _ = router._decide(hidden, tokens, None, fused=False)
    carry = fused_routing.decide(logits, bias, 0.7)
    assert torch.equal(carry[..., R:2 * R].isinf(), ref[..., R:2 * R].isinf())
    torch.testing.assert_close(carry, ref, rtol=1e-6, atol=1e-6)
    assert carry[0, 0, R:2 * R].isinf().tolist() == [False] + [True] * (R - 1)
    assert carry[0, 1, R:2 * R].isinf().tolist() == [False, False] + [True] * (R - 2)

    ran = []
    monkeypatch.setattr(fused_routing, "decide", lambda *a: ran.append(1))
    route = router.train().route(0, hidden, tokens, None, None, fused=True)
    assert ran == [] and "router_balance" in route.losses


@needs_kernel
@pytest.mark.parametrize("M", [1, 5, 37])
def test_prefix_offsets_kernel_matches_the_ops(M):
    n = torch.tensor([0, M, M // 2])  # none, all and some of the slots taken
    mask = (torch.arange(M)[None] < n[:, None]).to(DEVICE)
    expected = PrefixKeys.of(mask).cu_seqlens
    assert expected.tolist() == [0, 0, M, 2 * M, 2 * M, 2 * M + M // 2, 3 * M]
    assert torch.equal(PrefixKeys.of(mask, fused=True).cu_seqlens, expected)


def _spy_routing(monkeypatch) -> list[str]:
    """Record which of fused_routing's kernels run, in order."""
    ran = []
    for name in ("decide", "prefix_offsets"):
        kernel = getattr(fused_routing, name)
        monkeypatch.setattr(fused_routing, name,
                            lambda *a, name=name, kernel=kernel: ran.append(name) or kernel(*a))
    return ran


@needs_kernel
@pytest.mark.parametrize("unit", ["token", "segment"])
def test_token_choice_bookkeeping_runs_fused_where_the_merges_do(monkeypatch, unit):
    """Eager fused inference: token-choice's decision in one launch per forward, each padded
    step's attention offsets in one each (what the launches compute: the two tests above and
    test_fused_forward_equals_unfused); not in training, nor with the fused merges off."""
    on, off = _pair(TokenChoiceRouter, unit)
    ran = _spy_routing(monkeypatch)
    tokens = on_device(random_tokens(2, 24, 32, segments=None if unit == "token" else 4),
                       DEVICE)
    tokens = tokens.replace(contiguous_segments=unit == "segment")
    on(tokens)
    with torch.no_grad():
        off(tokens)
        assert ran == []
        on(tokens)
    assert ran == ["decide"] + ["prefix_offsets"] * 3


@needs_kernel
def test_token_choice_bookkeeping_runs_fused_over_padded_clips_too(monkeypatch):
    """Padded clips take the masked loop, whose merges stay unfused; token-choice's decision and
    its steps' attention offsets still run as one launch each, with the same outputs."""
    on, off = _pair(TokenChoiceRouter)
    ran = _spy_routing(monkeypatch)
    tokens = on_device(random_tokens(2, 24, 32, lengths=[24, 17]), DEVICE)
    assert not on.router.compact(on._units(tokens))
    with torch.no_grad():
        a, b = on(tokens), off(tokens)
    assert ran == ["decide"] + ["prefix_offsets"] * 3
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.depth, b.depth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs CUDA")
@pytest.mark.parametrize("unit", ["token", "segment"])
def test_fused_forward_on_cuda_under_autocast(unit):
    """bf16 autocast on the GPU (fp32 stream, bf16 MLP output): the compiled kernel against the
    unfused ops. Scores sum in another order, so near-ties may rank differently: compare the
    selections' overlap and the outputs of tokens with equal depth."""
    on, off = _pair(ExpertChoiceRouter, unit)
    tokens = on_device(random_tokens(4, 96, 32, segments=4 if unit == "segment" else None),
                       DEVICE)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        a, b = on(tokens), off(tokens)
    same = a.depth == b.depth
    assert same.float().mean() > 0.95
    torch.testing.assert_close(a.hidden[same], b.hidden[same], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor compiles Triton for CUDA")
@pytest.mark.parametrize("router_cls", [ExpertChoiceRouter, TokenChoiceRouter])
def test_compiled_forward_runs_the_kernel_on_cuda(monkeypatch, router_cls):
    """Under torch.compile the kernel is traced into the graph (the spy runs while compiling)
    and the compiled forward matches the unfused ops in eager mode, as the eager kernel does;
    also in the graph with dynamic sizes that a second batch size or clip length compiles."""
    torch._dynamo.reset()
    on, off = _pair(router_cls)
    calls = _spy(monkeypatch)
    compiled = torch.compile(on)
    for B, N in ((4, 96), (3, 96), (5, 80)):
        tokens = on_device(random_tokens(B, N, 32), DEVICE)
        calls.clear()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            a, b = compiled(tokens), off(tokens)
        if B != 5:  # the first two shapes compile (static, then dynamic); the third reuses
            assert len(calls) == 4
        same = a.depth == b.depth
        assert same.float().mean() > 0.95
        torch.testing.assert_close(a.hidden[same], b.hidden[same], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's C++ wrapper for CUDA")
@pytest.mark.parametrize("router_cls", [ExpertChoiceRouter, TokenChoiceRouter])
def test_compiled_inference_in_the_cpp_wrapper_then_training_in_the_python_one(router_cls):
    """MoRModule's compiled path: inference graphs built under inference_config (C++ wrapper,
    the fused kernel inside) match the unfused ops; a training step of the same compiled model
    afterwards compiles apart and gives eager's gradients (the C++ wrapper could not build the
    backward on torch 2.11)."""
    torch._dynamo.reset()
    on, off = _pair(router_cls)
    compiled = torch.compile(on, options=compile_options())
    tokens = on_device(random_tokens(4, 96, 32), DEVICE)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        with inference_config(None, DEVICE):
            a = compiled(tokens)
        b = off(tokens)
    same = a.depth == b.depth
    assert same.float().mean() > 0.95
    torch.testing.assert_close(a.hidden[same], b.hidden[same], rtol=2e-2, atol=2e-2)

    on.train(), off.train()
    grads = []
    for model in (compiled, off):
        on.zero_grad(), off.zero_grad()
        out = model(tokens)
        (out.hidden.square().mean() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in (on if model is compiled else off).parameters()])
    for g_compiled, g_eager in zip(*grads):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-3, atol=1e-4)
