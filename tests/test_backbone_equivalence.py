"""MoR against plain recursion and against a slow, obviously-correct reference implementation.

The reference runs each sample alone, drops its padding, picks the routed tokens with a plain
top-k over index lists and runs the shared layers on exactly those tokens; recursive KV sharing
is written out by hand (full qkv projection, explicit softmax attention). The backbone's fast
path (static-K gather / scatter_add, key masks, segment pooling) must agree with it.
"""

import math
from fractions import Fraction

import pytest
import torch

from encoders.tokens import Tokens
from helpers import random_tokens, randomize_router
from mormm.backbone import (
    STRATEGIES,
    BackboneConfig,
    ExpertChoiceRouter,
    MoRBackbone,
    TokenChoiceRouter,
    layer_schedule,
)
from mormm.backbone.rotary import apply_rotary

DIM, HEADS = 32, 4
TOL = dict(atol=1e-5, rtol=1e-5)
DEPTHS = {"none": 6, "cycle": 6, "sequence": 6, "middle_cycle": 8, "middle_sequence": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tokens(B=3, N=12, seed=0, lengths=None, segments=None):
    """Random tokens (x2 scale); `lengths` pads sample b after lengths[b] tokens (garbage
    embeddings); `segments` (list of segment sizes) gives contiguous multi-token segments."""
    return random_tokens(B, N, DIM, lengths, segments, seed, scale=2.0)


def build(strategy="cycle", router=None, R=3, seed=0, **cfg):
    torch.manual_seed(seed)
    default = DEPTHS[strategy] if R == 3 else {"cycle": 4, "middle_cycle": 6}[strategy]
    L = cfg.pop("num_layers", default)
    config = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L, num_recursions=R,
                            sharing=strategy, rope_axes=2, **cfg)
    model = MoRBackbone(config, router)
    with torch.no_grad():  # larger weights than the ViT init so that every difference shows
        for layer in model.layers:
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    randomize_router(model)
    return model.eval()


def copy_weights(dst: MoRBackbone, src: MoRBackbone) -> None:
    dst.layers.load_state_dict(src.layers.state_dict())
    dst.norm.load_state_dict(src.norm.state_dict())


def ceil_cap(cap: float, n: int) -> int:
    return math.ceil(Fraction(cap).limit_denominator(1000) * n)


def attend_shared(block, x, rope, kv):
    """Recursive KV sharing by hand: queries of x, keys/values of the first recursion."""
    B, n, D = x.shape
    H = block.attn.num_heads
    q = block.attn.qkv(block.norm1(x))[..., :D].view(B, n, H, D // H)
    if rope is not None:
        q = apply_rotary(q, rope)
    q = q.transpose(1, 2)
    k, v = kv
    att = (q @ k.transpose(-1, -2) / math.sqrt(D // H)).softmax(-1) @ v
    x = x + block.attn.proj(att.transpose(1, 2).reshape(B, n, D))
    return x + block.mlp(block.norm2(x))


@torch.no_grad()
def reference(model: MoRBackbone, tokens: Tokens):
    """(hidden, depth) computed one sample at a time on its valid tokens only."""
    cfg, router = model.config, model.router
    B, N, D = tokens.embeddings.shape
    valid = tokens.valid if tokens.valid is not None else torch.ones(B, N, dtype=torch.bool)
    table = model.rotary(tokens.positions)
    hidden, depth = torch.zeros(B, N, D), torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        keep = valid[b].nonzero().squeeze(1)
        n = len(keep)
        x = tokens.embeddings[b, keep][None].clone()
        seg = tokens.segment_ids[b, keep]
        rope = table[b, keep][None]
        for i in model.plan.prelude:
            x = model.layers[i](x, rope)[0]
        active = torch.arange(n)
        d = torch.zeros(n, dtype=torch.long)
        kvs = []
        for r, chunk in enumerate(model.plan.steps):
            gate = None
            if router is None:
                sel = torch.arange(n)
            elif isinstance(router, ExpertChoiceRouter) and router.unit == "token":
                logits = router.proj[r](x)[0, :, 0]
                top = logits[active].topk(ceil_cap(router.capacities[r], n)).indices
                sel = active[top].sort().values
                gate = router.alpha * torch.sigmoid(logits[sel])
            elif isinstance(router, ExpertChoiceRouter):  # segments: mean logit, whole segments
                logits = router.proj[r](x)[0, :, 0]
                ids = seg[active].unique()
                seg_logit = torch.stack([logits[seg == s].mean() for s in ids])
                top = ids[seg_logit.topk(ceil_cap(router.capacities[r], len(seg.unique()))).indices]
                sel = torch.isin(seg, top).nonzero().squeeze(1)
                gate = router.alpha * torch.sigmoid(
                    torch.stack([logits[seg == seg[t]].mean() for t in sel]))
            else:  # token-choice without overflow: depth = argmax + 1 decided before step 0
                if r == 0:
                    tc_logits = router.proj(x)[0]
                    choice = (tc_logits + router.depth_bias).argmax(-1)
                    tc_gate = router.alpha * tc_logits.softmax(-1).gather(-1, choice[:, None])[:, 0]
                sel = (choice >= r).nonzero().squeeze(1)
                gate = tc_gate[sel]
            active = sel
            if len(sel) == 0:  # token-choice: nobody in this sample goes this deep
                continue
            rope_sel = rope[:, sel]
            h_in = h = x[:, sel]
            for j, i in enumerate(chunk):
                if cfg.kv_mode == "shared" and r > 0:
                    h = attend_shared(model.layers[i], h, rope_sel, kvs[j])
                else:
                    h, kv = model.layers[i](h, rope_sel)
                    if cfg.kv_mode == "shared":
                        kvs.append(kv)
            if gate is None:
                x = h
            else:
                g = gate[None, :, None]
                upd = g * (h - h_in) if cfg.gate_update == "delta" else g * h
                x = x.index_add(1, sel, upd)
            d[sel] += 1
        for i in model.plan.coda:
            x = model.layers[i](x, rope)[0]
        hidden[b, keep] = model.norm(x)[0]
        depth[b, keep] = d
    return hidden, depth


def assert_valid_close(out, ref_hidden, ref_depth, tokens):
    v = tokens.valid if tokens.valid is not None else torch.ones(out.depth.shape, dtype=torch.bool)
    torch.testing.assert_close(out.hidden[v], ref_hidden[v], **TOL)
    assert torch.equal(out.depth, ref_depth)


@pytest.mark.parametrize("kv_mode", ["recursion", "shared"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capacity_one_unit_gate_equals_plain_recursion(strategy, kv_mode):
    plain = build(strategy, None, kv_mode=kv_mode)
    # Capacity 1 everywhere and a gate of exactly 1: zero router weights give logit 0 and
    # alpha * sigmoid(0) = 2 * 0.5 = 1, so h + g * (f(h) - h) = f(h).
    router = ExpertChoiceRouter(capacities=[1.0, 1.0, 1.0], alpha=2.0)
    mor = build(strategy, router, kv_mode=kv_mode, gate_update="delta")
    copy_weights(mor, plain)
    with torch.no_grad():
        for p in mor.router.proj.parameters():
            p.zero_()
    tokens = make_tokens()
    out_mor, out_plain = mor(tokens), plain(tokens)
    assert all(torch.equal(s.gate, torch.ones_like(s.gate)) for s in out_mor.steps)
    torch.testing.assert_close(out_mor.hidden, out_plain.hidden, **TOL)
    assert torch.equal(out_mor.depth, out_plain.depth) and (out_mor.depth == 3).all()

    rope = plain.rotary(tokens.positions)
    if kv_mode == "recursion":  # hand-written loop over the flat layer schedule
        x = tokens.embeddings
        cfg = plain.config
        for i in layer_schedule(strategy, cfg.num_layers, cfg.num_recursions):
            x = plain.layers[i](x, rope)[0]
        torch.testing.assert_close(out_plain.hidden, plain.norm(x), **TOL)
    else:  # later steps attend to step-0 keys/values: differs from the recursion-mode result
        ref_hidden, _ = reference(plain, tokens)
        torch.testing.assert_close(out_plain.hidden, ref_hidden, **TOL)
        plain.config.kv_mode = "recursion"
        assert not torch.allclose(plain(tokens).hidden, out_plain.hidden, atol=1e-3)


@pytest.mark.parametrize("kv_mode", ["recursion", "shared"])
def test_plain_recursion_with_padding_matches_reference(kv_mode):
    model = build("middle_cycle", None, kv_mode=kv_mode)
    tokens = make_tokens(lengths=[12, 7, 3])
    assert_valid_close(model(tokens), *reference(model, tokens), tokens)


CASES = [  # strategy, N_r, capacities
    ("cycle", 3, None),
    ("middle_cycle", 3, None),
    ("sequence", 3, [1.0, 0.5, 0.25]),
    ("middle_cycle", 4, [1.0, 0.75, 0.5, 0.25]),
    ("cycle", 4, [1.0, 0.75, 0.5, 0.25]),
]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("gate_update", ["delta", "output"])
@pytest.mark.parametrize("kv_mode", ["recursion", "shared"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-R{c[1]}")
def test_expert_choice_matches_reference(case, kv_mode, gate_update, padded):
    strategy, R, caps = case
    model = build(strategy, ExpertChoiceRouter(capacities=caps), R=R, kv_mode=kv_mode,
                  gate_update=gate_update)
    tokens = make_tokens(lengths=[12, 9, 5] if padded else None)
    out = model(tokens)
    ref_hidden, ref_depth = reference(model, tokens)
    assert_valid_close(out, ref_hidden, ref_depth, tokens)
    # The comparison is sensitive: routing changes the result well beyond the tolerance.
    plain = build(strategy, None, R=R, kv_mode=kv_mode)
    copy_weights(plain, model)
    assert not torch.allclose(out.hidden, plain(tokens).hidden, atol=1e-3)


@pytest.mark.parametrize("kv_mode", ["recursion", "shared"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_segment_expert_choice_matches_reference(padded, kv_mode):
    model = build("cycle", ExpertChoiceRouter(unit="segment", capacities=[1.0, 0.75, 0.5, 0.25]),
                  R=4, kv_mode=kv_mode)
    tokens = make_tokens(N=14, lengths=[14, 10, 5] if padded else None,
                         segments=[2, 3, 1, 2, 2, 4])
    assert_valid_close(model(tokens), *reference(model, tokens), tokens)


@pytest.mark.parametrize("kv_mode", ["recursion", "shared"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_token_choice_matches_reference(padded, kv_mode):
    # capacity_factor 3 lifts every step's bound to 1: no overflow, depth = argmax + 1.
    router = TokenChoiceRouter(capacity_factor=3.0)
    model = build("middle_cycle", router, kv_mode=kv_mode)
    with torch.no_grad():
        router.proj.weight.mul_(30)  # spread the choices over all depths
        router.depth_bias.copy_(torch.tensor([0.0, 0.3, -0.2]))  # the bias steers selection
    tokens = make_tokens(lengths=[12, 9, 5] if padded else None)
    out = model(tokens)
    ref_hidden, ref_depth = reference(model, tokens)
    assert_valid_close(out, ref_hidden, ref_depth, tokens)
    v = out.depth[tokens.valid] if padded else out.depth.flatten()
    assert set(v.tolist()) == {1, 2, 3}
