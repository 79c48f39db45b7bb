"""Compute is really skipped (rows and FLOPs), and the forward never syncs with the host."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from helpers import random_tokens, randomize_router
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone, TokenChoiceRouter
from mormm.backbone.layers import Block
from mormm.bench.timing import KernelCounter

DIM, HEADS, B, N = 32, 4, 2, 24


pytestmark = pytest.mark.usefixtures("one_thread")


def build(router=None, R=3, L=None, sharing="cycle", kv_mode="recursion"):
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L or R, num_recursions=R,
                         sharing=sharing, rope_axes=2, kv_mode=kv_mode)
    return MoRBackbone(cfg, router).eval()


def make_tokens(n=N, lengths=None, segments=None, seed=0):
    return random_tokens(B, n, DIM, lengths, segments, seed)


def qkv_rows(model, tokens):
    """Rows each shared layer's fused qkv projection saw, in call order."""
    rows = []
    def count(module, args, output):
        rows.append(args[0].shape[:-1].numel())

    hooks = [layer.attn.qkv.register_forward_hook(count) for layer in model.layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return rows


def flops(model, tokens):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    return counter.get_total_flops()


@pytest.mark.parametrize("R,caps,kept", [(3, None, [24, 16, 8]),
                                         (4, [1.0, 0.75, 0.5, 0.25], [24, 18, 12, 6])])
def test_steps_process_only_the_selected_tokens(R, caps, kept):
    mor = build(ExpertChoiceRouter(capacities=caps), R=R)
    assert qkv_rows(mor, make_tokens()) == [B * k for k in kept]
    assert qkv_rows(build(None, R=R), make_tokens()) == [B * N] * R
    # With padding the static bound comes from the padded length, not from the data.
    assert qkv_rows(mor, make_tokens(lengths=[24, 10])) == [B * k for k in kept]


@pytest.mark.parametrize("unit,factor,kept", [("token", 1.0, [24, 16, 8]),
                                              ("token", 1.25, [24, 20, 10]),
                                              ("segment", 1.0, [24, 18, 9])])
def test_token_choice_steps_gather_only_their_capacity(unit, factor, kept):
    """Token-choice never falls back to computing every token: step j runs on the static bound
    capacity_factor x capacities[j], however the choices fall (here: everyone wants depth 3)."""
    router = TokenChoiceRouter(capacity_factor=factor, unit=unit)
    mor = build(router)
    with torch.no_grad():
        router.depth_bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    tokens = make_tokens(segments=3 if unit == "segment" else None)
    assert qkv_rows(mor, tokens) == [B * k for k in kept]


def test_segment_steps_gather_whole_segments():
    mor = build(ExpertChoiceRouter(unit="segment"))  # 8 segments of 3: keep 8, 6, 3 segments
    assert qkv_rows(mor, make_tokens(segments=3)) == [B * 24, B * 18, B * 9]


def test_linear_flops_scale_with_capacity():
    """FlopCounterMode counts the linear layers on CPU (SDPA's CPU kernel is not counted), so the
    MoR/plain ratio is the capacity ratio plus the tiny routers, exactly."""
    tokens = make_tokens()
    mor, plain = build(ExpertChoiceRouter()), build(None)
    block = Block(DIM, HEADS)

    def block_flops(k):
        with FlopCounterMode(display=False) as c:
            block(torch.randn(B, k, DIM))
        return c.get_total_flops()

    f_mor, f_plain = flops(mor, tokens), flops(plain, tokens)
    # One D->1 projection per step over the tokens that compete for it: all 24 at the first two
    # steps (the first keeps everyone), the 16 the second kept at the third.
    router = 2 * B * DIM * (24 + 24 + 16)
    assert f_plain == 3 * block_flops(N)
    assert f_mor == block_flops(24) + block_flops(16) + block_flops(8) + router
    assert abs(f_mor / f_plain - 2 / 3) < 0.01


def test_shared_kv_skips_key_value_projections():
    """Recursive KV sharing: after step 0 only the query third of the qkv projection runs."""
    tokens = make_tokens()
    rec = build(ExpertChoiceRouter(), kv_mode="recursion")
    shared = build(ExpertChoiceRouter(), kv_mode="shared")
    shared.load_state_dict(rec.state_dict())
    assert qkv_rows(shared, tokens) == [B * N]  # the nn.Linear module runs at step 0 only
    saved = 2 * (2 * B * 16 * DIM * DIM + 2 * B * 8 * DIM * DIM)  # K and V rows of steps 1, 2
    assert flops(rec, tokens) - flops(shared, tokens) == saved


class SyncRecorder(TorchDispatchMode):
    """Records aten ops that force a device -> host sync (or a data-dependent output shape) when
    the same code runs on an accelerator. Catches what fullgraph misses (torch 2.11 traces
    `.item()` in arithmetic and boolean indexing without a graph break)."""

    SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "is_nonzero",
                "equal", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                "repeat_interleave", "histc", "allclose"}

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNC_OPS:
            self.hits.append(name)
        if name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)):
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1]):
                self.hits.append(f"{name}[bool mask]")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make_router,lengths", [
    (lambda: None, None),  # plain recursion
    (ExpertChoiceRouter, None),  # the compact loop
    (TokenChoiceRouter, [24, 17]),  # padded: the masked loop
])
def test_depth_is_counted_when_read_not_in_the_forward(make_router, lengths):
    """BackboneOutput.depth costs a forward nothing until read (a classifier's inference never
    reads it); the first read counts it, later reads return the same tensor, and it is the
    number of steps that selected each token."""
    model = build(make_router())
    out = model(make_tokens(lengths=lengths))
    with KernelCounter() as first:
        depth = out.depth
    with KernelCounter() as again:
        assert out.depth is depth
    assert first.ops > 0 and again.ops == 0
    assert torch.equal(depth, torch.stack([s.selected for s in out.steps]).sum(0))
    assert depth.dtype == torch.long and depth.shape == (B, N)
    if lengths:
        assert (depth[~out.valid] == 0).all() and (depth[out.valid] >= 1).all()


def _reachable_tensors(root) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through containers, objects and closures (a
    function's globals and code left out)."""
    import gc
    import types

    seen, todo, found = set(), [root], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, torch.nn.Module)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, types.FunctionType):
            todo.extend(cell.cell_contents for cell in obj.__closure__ or ())
        else:
            todo.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("make_router,lengths", [(ExpertChoiceRouter, None),
                                                 (TokenChoiceRouter, [24, 17])])
def test_inference_output_holds_no_hidden_states_but_its_own(make_router, lengths):
    """What the output keeps to build its depth and traces on demand (positions, selections,
    logits) is small: no (B, N, D) working tensor of the forward outlives it but `hidden`."""
    model = build(make_router())
    tokens = make_tokens(lengths=lengths)
    with torch.no_grad():
        out = model(tokens)
    wide = [t for t in _reachable_tensors(out) if t.dim() == 3 and t.shape[-1] == DIM]
    assert wide and all(t is out.hidden for t in wide)


def _fullgraph(model, tokens):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    return compiled(tokens)  # raises on a graph break (data-dependent control flow, .tolist())


COMPILE_CASES = {  # padded clips take the masked loop, unpadded ones the compact one
    "expert": (lambda: ExpertChoiceRouter(), dict()),
    "expert_unpadded": (lambda: ExpertChoiceRouter(), dict(lengths=None)),
    "expert_segment": (lambda: ExpertChoiceRouter(unit="segment"), dict(segments=3)),
    "expert_segment_unpadded": (lambda: ExpertChoiceRouter(unit="segment"),
                                dict(segments=3, lengths=None)),
    "token_choice": (lambda: TokenChoiceRouter(), dict()),
    "token_choice_unpadded": (lambda: TokenChoiceRouter(), dict(lengths=None)),
    "token_choice_segment_unpadded": (lambda: TokenChoiceRouter(unit="segment"),
                                      dict(segments=3, lengths=None)),
    "expert_threshold": (lambda: ExpertChoiceRouter(inference="threshold"), dict()),
}


@pytest.mark.parametrize("kv_mode", ["recursion", "shared"])
@pytest.mark.parametrize("kind", list(COMPILE_CASES))
def test_forward_has_no_host_sync(kind, kv_mode):
    make_router, tok_args = COMPILE_CASES[kind]
    model = build(make_router(), L=5, sharing="middle_cycle", kv_mode=kv_mode)
    tokens = make_tokens(**{"lengths": [24, 17], **tok_args})
    w = torch.randn(B, N, DIM)
    for train in (True, False):
        model.train(train)
        with SyncRecorder() as rec:
            ref = model(tokens)
            if train:
                ((ref.hidden * w).sum() + ref.aux_loss).backward()
        assert rec.hits == []
        out = _fullgraph(model, tokens)
        torch.testing.assert_close(out.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.depth, ref.depth)


def test_sync_checks_catch_host_syncs():
    x = torch.randn(5)
    for sync in (lambda: x * x.sum().item(), lambda: x[x > 0], lambda: x.nonzero(),
                 lambda: x.unique(), lambda: bool(x.sum() > 0)):
        with SyncRecorder() as rec:
            sync()
        assert rec.hits, sync

    class Branches(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|unsupported"):
        torch.compile(Branches(), fullgraph=True, backend="eager")(torch.ones(3))


@pytest.mark.parametrize("make_router", [ExpertChoiceRouter, TokenChoiceRouter])
def test_compiled_inference_casts_each_shared_weight_once(make_router):
    """Under autocast a compiled graph casts a linear's weight at every use (eager mode caches
    the cast, a graph does not): a layer shared by three recursions would cast its weights three
    times per forward, one kernel launch each. The backbone casts its linears once instead,
    with the same outputs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    casts = []

    def record(gm, example_inputs):
        inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
        casts.extend(n.args[0] for n in gm.graph.nodes
                     if n.target == torch.ops.aten._to_copy.default and n.args[0] in inputs)
        return make_boxed_func(gm.forward)

    model = build(make_router(), R=3)  # one shared layer, three recursions
    tokens = make_tokens(lengths=None)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(tokens)
        out = compiled(tokens)
    linears = sum(1 for m in model.layers.modules() if isinstance(m, torch.nn.Linear)
                  for _ in m.parameters(recurse=False))
    # Every weight and bias of the layers, each once; nothing else: the router scores the fp32
    # stream with its fp32 weights (no cast of its weights or of the input embeddings).
    assert len(casts) == len(set(casts)) == linears
    torch.testing.assert_close(out.hidden, ref.hidden, atol=2e-2, rtol=2e-2)
    assert torch.equal(out.depth, ref.depth)


@pytest.mark.parametrize("unit,tok_args", [("token", {}), ("segment", dict(segments=3))])
def test_compiled_router_scores_are_a_row_sum_of_the_stream(unit, tok_args):
    """Compiled, a linear expert-choice router scores the fp32 stream as a product and a row sum,
    which inductor computes in the kernel that wrote the stream (the previous step's merge), not
    as a matrix product that reads it again. The scores, so the routing, are the eager ones."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    model = build(ExpertChoiceRouter(capacities=[1.0, 0.75, 0.5, 0.25], unit=unit), R=4)
    randomize_router(model)
    tokens = make_tokens(lengths=None, **tok_args)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record))
    with torch.no_grad():
        ref, out = model(tokens), compiled(tokens)
    (gm,) = graphs
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.mv.default,
               torch.ops.aten.bmm.default}
    mms = [n for n in gm.graph.nodes if n.target in matmuls]
    # The layers' four linears per layer application, and nothing else: no matrix product with a
    # (D, 1) router weight.
    assert all(n.args[-1].meta["val"].shape[-1] > 1 for n in mms)
    assert len(mms) == 4 * 4
    torch.testing.assert_close(out.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.depth, ref.depth)


@pytest.mark.parametrize("block_len", [1, 3])
def test_scatter_blocks_in_place_equals_the_copy(block_len):
    """Writing a working set back: in place (into the parent's memory) or into a copy, the same
    values, for rows (L = 1) and whole blocks of L rows."""
    from mormm.backbone.units import gather_blocks, scatter_blocks

    g = torch.Generator().manual_seed(0)
    B, U, K, D = 2, 5, 3, 4
    parent = torch.randn(B, U * block_len, D, generator=g)
    index = torch.stack([torch.randperm(U, generator=g)[:K] for _ in range(B)])
    src = torch.randn(B, K * block_len, D, generator=g)
    copy = scatter_blocks(parent, index, src, block_len, inplace=False)
    assert not torch.equal(copy, parent)
    assert torch.equal(gather_blocks(copy, index, block_len), src)
    spared = torch.ones(B, U, dtype=torch.bool)  # the units index does not pick
    spared[torch.arange(B)[:, None], index] = False
    untouched = spared.repeat_interleave(block_len, 1)
    assert torch.equal(copy[untouched], parent[untouched])
    out = scatter_blocks(parent, index, src, block_len, inplace=True)
    assert out.data_ptr() == parent.data_ptr() and torch.equal(parent, copy)
