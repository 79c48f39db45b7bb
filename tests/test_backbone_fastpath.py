"""The gather/scatter fast paths compute the same function as a dense masked reference.

The reference runs every recursion step on all N tokens and masks: attention keys restricted to the
step's selected tokens (recursion-wise KV) and the gated update applied only where selected. The
fast paths gather the K selected tokens, skip masks when the selection is exact, reuse the
router's top-k indices and cast rotary tables once under autocast; expert-choice over unpadded
clips keeps the active tokens gathered between steps (the compact working set).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from encoders.tokens import Tokens
from helpers import randomize_router
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone, TokenChoiceRouter
from mormm.backbone.layers import PrefixKeys


def _dense_step(self, r, chunk, x, rope, valid, selected, gate, K, exact, shared_kv, index=None,
                taken=None, fused=False):
    h = x
    for j, i in enumerate(chunk):
        h, _ = self._layer(i, h, rope, selected, valid, r, j, shared_kv)
    return torch.where(selected[..., None], self._merge(x, h, gate), x)


def _models(router: str, unit: str, kv_mode: str, sharing: str):
    cfg = BackboneConfig(dim=32, num_heads=2, num_layers=8 if sharing == "cycle" else 10,
                         num_recursions=4, sharing=sharing, kv_mode=kv_mode)
    caps = [1.0, 0.75, 0.5, 0.25]
    make = (lambda: ExpertChoiceRouter(caps, unit=unit)) if router == "ec" else (
        lambda: TokenChoiceRouter(caps, unit=unit))
    torch.manual_seed(0)
    fast = MoRBackbone(cfg, make())
    randomize_router(fast)  # zero-initialised routers tie every score: selections by index order
    ref = MoRBackbone(cfg, make())
    ref.load_state_dict(fast.state_dict())
    ref._step = types.MethodType(_dense_step, ref)
    ref.router.compact = lambda units: False  # the masked loop, whose step is the dense one
    return fast, ref


def _tokens(padded: bool, B=3, T=4, F=6, D=32) -> Tokens:
    N = T * F
    pos = torch.cartesian_prod(torch.arange(T.__float__()), torch.arange(F.__float__()))
    pos = pos.expand(B, N, 2).contiguous()
    seg = pos[..., 0].long()
    mask = None
    if padded:
        mask = torch.zeros(B, N, dtype=torch.bool)
        mask[1, -F:] = True  # one clip a segment shorter
        mask[2, -2 * F - 3:] = True  # and one ending mid-segment
    return Tokens(torch.randn(B, N, D), pos, seg, torch.zeros_like(seg), mask, T, F)


CASES = [
    ("ec", "token", "recursion", "cycle"),
    ("ec", "segment", "recursion", "cycle"),
    ("ec", "token", "shared", "cycle"),
    ("ec", "token", "recursion", "middle_cycle"),
    ("tc", "token", "recursion", "cycle"),
    ("tc", "segment", "shared", "cycle"),
]


@pytest.mark.parametrize("router,unit,kv_mode,sharing", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_fast_matches_dense_reference(router, unit, kv_mode, sharing, padded):
    fast, ref = _models(router, unit, kv_mode, sharing)
    tokens = _tokens(padded)
    for train in (False, True):
        fast.train(train), ref.train(train)
        a, b = fast(tokens), ref(tokens)
        valid = torch.ones_like(a.depth, dtype=torch.bool) if a.valid is None else a.valid
        torch.testing.assert_close(a.hidden[valid], b.hidden[valid], atol=1e-5, rtol=1e-5)
        assert torch.equal(a.depth, b.depth)
        for sa, sb in zip(a.steps, b.steps, strict=True):  # the maps analysis and logging read
            assert torch.equal(sa.selected, sb.selected)
            torch.testing.assert_close(sa.gate[sa.selected], sb.gate[sb.selected])
        torch.testing.assert_close(a.aux_loss, b.aux_loss)
    # Gradients agree too (training uses the same fast path).
    (a.hidden[valid].square().mean() + a.aux_loss).backward()
    (b.hidden[valid].square().mean() + b.aux_loss).backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("router,unit", [("ec", "token"), ("ec", "segment"), ("tc", "token")])
def test_fast_matches_reference_under_bf16_autocast(router, unit):
    fast, ref = _models(router, unit, "recursion", "cycle")
    fast.eval(), ref.eval()
    tokens = _tokens(False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast(tokens), ref(tokens)
    ref32 = ref(tokens).hidden.detach()  # fp32 reference: both bf16 runs stay within bf16 error
    err = lambda h: ((h.float() - ref32).norm() / ref32.norm()).item()  # noqa: E731
    assert err(a.hidden) < 3e-2 and err(b.hidden) < 3e-2


def test_compact_steps_rank_only_what_the_last_step_kept():
    fast, _ = _models("ec", "token", "recursion", "cycle")
    fast.eval()
    tokens = _tokens(False)
    assert fast.router.compact(fast._units(tokens))
    captured = []
    route = fast.router.route

    def spy(step, hidden, units, active, carry, scores=None, fused=False):
        out = route(step, hidden, units, active, carry, scores, fused=fused)
        captured.append((hidden.shape[1], units.population, out))
        return out

    fast.router.route = spy
    fast(tokens)
    N = tokens.embeddings.shape[1]
    # Step 0 keeps everyone (no index); each later step ranks only the tokens the last one kept.
    assert [m for m, _, _ in captured] == [N, N, 18, 12]
    assert captured[0][2].index is None
    for (m, population, route), kept in zip(captured[1:], [18, 12, 6]):
        assert population == N and route.exact and route.index.shape == (3, kept)
        ranked = route.index.sort(-1).values
        assert (ranked[:, 1:] > ranked[:, :-1]).all() and int(route.index.max()) < m  # distinct


def test_compact_inference_leaves_the_input_embeddings_alone():
    """The compact path scatters in place at inference, but never into the caller's tensor."""
    cfg = BackboneConfig(dim=32, num_heads=2, num_layers=3, num_recursions=3, sharing="cycle")
    torch.manual_seed(0)
    model = MoRBackbone(cfg, ExpertChoiceRouter([0.5, 0.5, 0.25])).eval()  # no step keeps all
    tokens = _tokens(False)
    before = tokens.embeddings.clone()
    with torch.no_grad():
        out = model(tokens)
    assert torch.equal(tokens.embeddings, before)
    assert out.depth.sum() == 3 * (12 + 12 + 6)


@pytest.mark.parametrize("router,unit,padded", [("tc", "token", False), ("tc", "segment", True),
                                                ("ec", "token", True), ("ec", "segment", True)])
def test_masked_steps_put_the_taken_tokens_first(router, unit, padded):
    """Routed steps that may hold padding slots lay out the taken tokens first in every row, the
    layout that lets CUDA run them as variable-length flash attention without a mask."""
    fast, _ = _models(router, unit, "recursion", "cycle")
    seen = []
    for layer in fast.layers:
        attend = layer.attn.forward
        def spy(x, rope, keys, attend=attend):
            seen.append(keys)
            return attend(x, rope, keys)

        layer.attn.forward = spy
    fast(_tokens(padded))
    prefixes = [k for k in seen if isinstance(k, PrefixKeys)]
    assert prefixes
    for keys in prefixes:
        m = keys.mask
        assert (m[:, 1:] <= m[:, :-1]).all()  # True, ..., True, False, ..., False
        n = m.sum(-1)
        expected = torch.stack((n, m.shape[1] - n), 1).flatten().cumsum(0)
        assert torch.equal(keys.cu_seqlens, torch.cat((torch.zeros(1), expected)).int())


def test_prefix_sequences_reproduce_the_key_mask():
    """What flash varlen computes from PrefixKeys (each row two sequences: taken slots, then
    padding), written out sequence by sequence, equals key-masked attention on the taken slots."""
    B, M, H, Dh = 3, 7, 2, 8
    mask = torch.arange(M) < torch.tensor([7, 3, 0])[:, None]
    keys = PrefixKeys.of(mask)
    q, k, v = (torch.randn(B, M, H, Dh) for _ in range(3))
    heads_first = lambda t: t.transpose(-3, -2)  # noqa: E731  (.., M, H, Dh) <-> (.., H, M, Dh)
    ref = heads_first(F.scaled_dot_product_attention(*map(heads_first, (q, k, v)),
                                                     attn_mask=mask[:, None, None]))
    rows = [t.reshape(B * M, H, Dh) for t in (q, k, v)]
    out = torch.full((B * M, H, Dh), float("nan"))
    cu = keys.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            seq = (heads_first(t[a:b]) for t in rows)
            out[a:b] = heads_first(F.scaled_dot_product_attention(*seq))
    torch.testing.assert_close(out.view(B, M, H, Dh)[mask], ref[mask])
    assert not out.isnan().any()  # every slot, padding too, belongs to exactly one sequence


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen runs on CUDA only")
@pytest.mark.parametrize("router,unit,padded,contiguous", [
    ("tc", "token", False, False), ("ec", "token", True, False), ("tc", "segment", False, True)])
def test_varlen_steps_match_masked_steps_on_cuda(router, unit, padded, contiguous, monkeypatch):
    """On the GPU (bf16) the varlen path computes what the key-masked path computes (measured
    on the H200: relative difference 3e-4 in the hidden states, equal depths); token-choice
    over contiguous segments takes it on blocks."""
    import mormm.backbone.layers as layers

    fast, _ = _models(router, unit, "recursion", "cycle")
    fast.cuda()
    t = dataclasses.replace(_tokens(padded), contiguous_segments=contiguous)
    tokens = dataclasses.replace(
        t, **{f.name: getattr(t, f.name).cuda() for f in dataclasses.fields(t)
              if torch.is_tensor(getattr(t, f.name))})
    outs = []
    for use_varlen in (True, False):
        if not use_varlen:
            monkeypatch.setattr(layers, "_varlen_ok", lambda q: False)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(fast(tokens))
    a, b = outs
    valid = torch.ones_like(a.depth, dtype=torch.bool) if a.valid is None else a.valid
    assert torch.equal(a.depth, b.depth)
    err = (a.hidden[valid].float() - b.hidden[valid].float()).norm() / b.hidden[valid].float().norm()
    assert err < 1e-2


def test_compact_segments_in_any_token_order_match_the_masked_loop():
    """Segments need not be contiguous: the compact path finds each segment's tokens (and stores
    gathered segments whole, one after the other) whatever the token order."""
    fast, ref = _models("ec", "segment", "recursion", "cycle")
    t = _tokens(False)
    perm = torch.randperm(t.embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    tokens = dataclasses.replace(t, embeddings=t.embeddings[:, perm],
                                 positions=t.positions[:, perm], segment_ids=t.segment_ids[:, perm],
                                 modality_ids=t.modality_ids[:, perm])
    assert fast.router.compact(fast._units(tokens))
    for train in (False, True):
        fast.train(train), ref.train(train)
        a, b = fast(tokens), ref(tokens)
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.depth, b.depth)
        for s, u in zip(a.steps, b.steps):  # whole segments take each step
            assert torch.equal(s.selected, u.selected)


@pytest.mark.parametrize("router", ["ec", "tc"])
def test_contiguous_segments_route_as_blocks_with_the_same_results(router):
    """Tokens whose segments are runs of max_segment_len tokens (contiguous_segments) are routed
    as blocks of the sequence, without segment-id bookkeeping: same outputs, depths, traces and
    gradients as routing the same segments by id."""
    fast, _ = _models(router, "segment", "recursion", "cycle")
    by_id = _tokens(False)
    blocks = dataclasses.replace(by_id, contiguous_segments=True)
    assert fast._units(blocks).segment_ids is None and fast._units(by_id).segment_ids is not None
    for train in (False, True):
        fast.train(train)
        fast.zero_grad()
        a = fast(blocks)
        (a.hidden.square().mean() + a.aux_loss).backward()
        grads = [p.grad.clone() for p in fast.parameters() if p.grad is not None]
        fast.zero_grad()
        b = fast(by_id)
        (b.hidden.square().mean() + b.aux_loss).backward()
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-6, rtol=1e-6)
        assert torch.equal(a.depth, b.depth)
        for sa, sb in zip(a.steps, b.steps, strict=True):
            assert torch.equal(sa.selected, sb.selected)
            torch.testing.assert_close(sa.gate, sb.gate)
            torch.testing.assert_close(sa.logits, sb.logits)
        torch.testing.assert_close(a.aux_loss, b.aux_loss)
        for ga, gb in zip(grads, [p.grad for p in fast.parameters() if p.grad is not None],
                          strict=True):
            torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)
