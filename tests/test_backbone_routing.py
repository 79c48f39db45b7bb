"""Routers: capacity schedules, hierarchical filtering, segments, token-choice balancing,
threshold inference and padding invariance."""

import math
from fractions import Fraction

import pytest
import torch

from helpers import random_tokens, randomize_router
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone, TokenChoiceRouter

DIM, HEADS = 32, 4
TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")


def ceil_cap(cap: float, n: int) -> int:
    return math.ceil(Fraction(cap).limit_denominator(1000) * n)


def build(router, R=3, sharing="cycle", kv_mode="recursion", seed=0):
    torch.manual_seed(seed)
    L = {"cycle": R, "middle_cycle": R + 2}[sharing]
    cfg = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L, num_recursions=R,
                         sharing=sharing, rope_axes=2, kv_mode=kv_mode)
    model = MoRBackbone(cfg, router)
    randomize_router(model)
    return model


def make_tokens(B=4, N=16, lengths=None, seed=0, seg_sizes=None):
    return random_tokens(B, N, DIM, lengths, seg_sizes, seed)


def unit_vector(seed):
    v = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def valid_of(tokens):
    B, N, _ = tokens.embeddings.shape
    return tokens.valid if tokens.valid is not None else torch.ones(B, N, dtype=torch.bool)


def check_hierarchy(out, valid):
    """Selections nest, never touch padding, and add up to the reported depth."""
    prev = valid
    for s in out.steps:
        assert not (s.selected & ~prev).any()
        prev = s.selected
    assert torch.equal(out.depth, torch.stack([s.selected for s in out.steps]).sum(0))
    assert (out.depth[~valid] == 0).all()


CAPS = [(3, None, [1.0, 2 / 3, 1 / 3]), (4, [1.0, 0.75, 0.5, 0.25], [1.0, 0.75, 0.5, 0.25]),
        (3, [1.0, 0.6, 0.3], [1.0, 0.6, 0.3]), (3, [0.5, 0.5, 0.1], [0.5, 0.5, 0.1])]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("R,caps,expected", CAPS, ids=lambda v: str(v))
def test_expert_choice_depth_follows_capacity_schedule(R, caps, expected, padded, train):
    model = build(ExpertChoiceRouter(capacities=caps), R=R).train(train)
    tokens = make_tokens(N=18, lengths=[18, 13, 9, 1] if padded else None)
    valid = valid_of(tokens)
    out = model(tokens)
    check_hierarchy(out, valid)
    for b in range(4):
        n = int(valid[b].sum())
        for j, cap in enumerate(expected):
            assert int((out.depth[b] >= j + 1).sum()) == ceil_cap(cap, n), (b, j)
    # Each step keeps the highest-scoring active tokens.
    prev = valid
    for s in out.steps:
        for b in range(4):
            kept, dropped = s.logits[b][s.selected[b]], s.logits[b][prev[b] & ~s.selected[b]]
            if len(dropped):
                assert kept.min() >= dropped.max()
        # The gate weighs the step's update by the router's score (maps are defined where the
        # tokens competed; compact steps leave the rest at 0).
        torch.testing.assert_close(s.gate[prev], 0.1 * torch.sigmoid(s.logits[prev]))
        prev = s.selected


def test_capacity_rounding_is_exact_for_thirds():
    model = build(ExpertChoiceRouter())  # default 1, 2/3, 1/3
    out = model(make_tokens(N=9, B=2))
    assert [int(s.selected[0].sum()) for s in out.steps] == [9, 6, 3]


@pytest.mark.parametrize("make", [ExpertChoiceRouter, TokenChoiceRouter])
def test_routers_score_in_fp32_under_autocast(make):
    """Under bf16 autocast a linear router reads the fp32 stream with its fp32 weights: the same
    logits as without autocast (a bf16 cast of the hidden states would round them)."""
    model = build(make(), R=3)
    units = model._units(make_tokens())
    hidden = torch.randn(4, 16, DIM)
    exact = model.router.route(0, hidden, units, None, None).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scored = model.router.route(0, hidden, units, None, None).logits
        # bf16 states (a tokenizer run under autocast) are scored as autocast would.
        low = model.router.route(0, hidden.bfloat16(), units, None, None).logits
    assert scored.dtype == torch.float32 and torch.equal(scored, exact)
    torch.testing.assert_close(low, exact, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("pad_segment", ["own", "shared"])
@pytest.mark.parametrize("R,caps", [(3, None), (4, [1.0, 0.75, 0.5, 0.25])])
def test_segment_routing_keeps_segments_whole(R, caps, pad_segment):
    sizes = [[3, 1, 2, 4, 2, 2, 1, 1], [1] * 16, [4, 4, 4, 4], [2, 2, 3, 3, 1, 1, 2, 2]]
    tokens = make_tokens(N=16, seg_sizes=sizes, lengths=[16, 11, 9, 14])
    if pad_segment == "shared":  # padded tokens carry the ids of real (valid) segments
        seg = tokens.segment_ids.clone()
        seg[~tokens.valid] = 0
        tokens = tokens.replace(segment_ids=seg)
    model = build(ExpertChoiceRouter(unit="segment", capacities=caps), R=R, sharing="middle_cycle")
    out = model(tokens)
    valid = tokens.valid
    check_hierarchy(out, valid)
    expected = model.router.capacities
    for b in range(4):
        seg = tokens.segment_ids[b][valid[b]]
        d = out.depth[b][valid[b]]
        segs = seg.unique()
        for s in segs:  # one depth, one logit and one gate per segment
            assert d[seg == s].unique().numel() == 1
            for st in out.steps:
                for t in (st.logits, st.gate):
                    v = t[b][valid[b]][seg == s]
                    torch.testing.assert_close(v, v[:1].expand_as(v))
        seg_depth = torch.stack([d[seg == s][0] for s in segs])
        for j, cap in enumerate(expected):  # capacity counted in segments
            assert int((seg_depth >= j + 1).sum()) == ceil_cap(cap, len(segs)), (b, j)
    # The segment logit is the mean of its valid tokens' logits.
    logit_tok = model.router.proj[0](_prelude(model, tokens))[..., 0]
    b, s = 0, 3
    mask = valid[b] & (tokens.segment_ids[b] == s)
    torch.testing.assert_close(out.steps[0].logits[b][mask][0], logit_tok[b][mask].mean())


def _prelude(model, tokens):
    x = tokens.embeddings
    rope = model.rotary(tokens.positions)
    for i in model.plan.prelude:
        x, _ = model.layers[i](x, rope, tokens.valid)
    return x


def test_token_choice_depths_and_capacity_bound():
    router = TokenChoiceRouter()  # capacity_factor 1: step j keeps at most capacities[j]
    model = build(router)
    with torch.no_grad():
        router.proj.weight.mul_(40)
        router.depth_bias.copy_(torch.tensor([0.0, 0.0, 0.5]))  # most tokens want depth 3
    tokens = make_tokens(N=18, lengths=[18, 12, 7, 3])
    valid = tokens.valid
    out = model(tokens)
    check_hierarchy(out, valid)
    d = out.depth[valid]
    assert d.min() >= 1 and d.max() <= 3
    logits = router.proj(tokens.embeddings)  # cycle: the router reads the embeddings
    choice = (logits + router.depth_bias).argmax(-1)
    reach = logits.softmax(-1).flip(-1).cumsum(-1).flip(-1)
    assert (out.depth <= (choice + 1) * valid).all()  # never deeper than chosen
    overflow = False
    for r, s in enumerate(out.steps):
        for b in range(4):
            n = int(valid[b].sum())
            wants = valid[b] & (choice[b] >= r)
            bound = ceil_cap(router.capacities[r], n)
            assert int(s.selected[b].sum()) == min(int(wants.sum()), bound)
            assert not (s.selected[b] & ~wants).any()
            dropped = wants & ~s.selected[b]
            if dropped.any():  # overflow exits early by priority P(depth >= r + 1)
                overflow = True
                assert reach[b, s.selected[b], r].min() >= reach[b, dropped, r].max()
    assert overflow  # the bias above overloads the deep steps, so the bound was exercised
    assert torch.allclose(out.stats["load"].sum(), torch.tensor(1.0))


def test_token_choice_loss_free_bias_moves_toward_balance():
    router = TokenChoiceRouter(balancing="loss_free", bias_rate=0.02, capacity_factor=3.0)
    model = build(router).train()  # the load statistic exists in training, where the bias moves
    tokens = make_tokens(B=8, N=32, seed=1)
    u = unit_vector(seed=2)
    tokens = tokens.replace(embeddings=tokens.embeddings + 2 * u)
    with torch.no_grad():  # skew the choices: depth 1 overloaded by a logit margin of ~0.6
        router.proj.weight[0] += 0.3 * u
    load0 = model(tokens).stats["load"]
    assert load0[0] > 0.9
    imbalance = [(load0 - 1 / 3).abs().max()]
    for _ in range(100):
        out = model(tokens)
        router.after_optimizer_step(out.stats)
        imbalance.append((out.stats["load"] - 1 / 3).abs().max())
    assert router.depth_bias[0] < -0.3  # the overloaded depth is pushed down ...
    assert (router.depth_bias[1:] > 0).all()  # ... the starved ones up
    assert max(imbalance[-10:]) < 0.2 * imbalance[0]
    depth = model(tokens).depth  # realised depths follow the balanced choice
    assert all(abs((depth == d).float().mean() - 1 / 3) < 0.15 for d in (1, 2, 3))
    # Only "loss_free" balancing touches the bias.
    other = TokenChoiceRouter(balancing="loss")
    build(other)
    other.after_optimizer_step({"load": torch.tensor([0.9, 0.05, 0.05])})
    assert torch.equal(other.depth_bias, torch.zeros(3))


@pytest.mark.parametrize("slack", [1.0, 1.5])
def test_threshold_inference_selects_positive_logits_within_buffer(slack):
    router = ExpertChoiceRouter(inference="threshold", threshold_slack=slack)
    model = build(router).eval()
    tokens = make_tokens(N=18, lengths=[18, 15, 10, 4], seed=3)
    # Every router scores along u; every 4th token sits on the negative side.
    u = unit_vector(seed=4)
    side = torch.where(torch.arange(18) % 4 == 0, -3.0, 3.0)
    tokens = tokens.replace(embeddings=tokens.embeddings + side[None, :, None] * u)
    with torch.no_grad():
        for proj in router.proj:
            proj.weight.copy_(u)
    out = model(tokens)
    check_hierarchy(out, tokens.valid)
    # Capacity 1 (step 0) leaves nothing to decide: every valid token takes it, whatever its
    # logit, so every token gets at least one recursion in threshold mode too.
    assert torch.equal(out.steps[0].selected, tokens.valid)
    assert (out.steps[0].logits[tokens.valid] <= 0).any()
    prev, saw_clip = out.steps[0].selected, False
    for r, s in list(enumerate(out.steps))[1:]:
        positive = prev & (s.logits > 0)
        assert not (s.selected & ~positive).any()  # only tokens with logit > 0
        for b in range(4):
            n = int(tokens.valid[b].sum())
            buffer = ceil_cap(min(1.0, router.capacities[r] * slack), n)
            assert int(s.selected[b].sum()) == min(int(positive[b].sum()), buffer)
            saw_clip |= int(positive[b].sum()) > buffer
        prev = s.selected
    assert saw_clip
    # Training mode ignores the threshold: plain top-k.
    out = model.train()(tokens)
    assert [int(s.selected[0].sum()) for s in out.steps] == [18, 12, 6]


def pad_tokens(tokens, extra, seed=7, segment_ids=None):
    """Append `extra` padded tokens with garbage embeddings and positions."""
    g = torch.Generator().manual_seed(seed)
    B, N, D = tokens.embeddings.shape
    pad = tokens.padding_mask if tokens.padding_mask is not None else torch.zeros(B, N, dtype=bool)
    seg_pad = (segment_ids if segment_ids is not None
               else torch.randint(0, tokens.num_segments, (B, extra), generator=g))
    return tokens.replace(
        embeddings=torch.cat((tokens.embeddings, 50 * torch.randn(B, extra, D, generator=g)), 1),
        positions=torch.cat((tokens.positions, 100 * torch.rand(B, extra, 2, generator=g)), 1),
        segment_ids=torch.cat((tokens.segment_ids, seg_pad), 1),
        modality_ids=torch.cat((tokens.modality_ids, tokens.modality_ids[:, :extra]), 1),
        padding_mask=torch.cat((pad, torch.ones(B, extra, dtype=torch.bool)), 1),
    )


ROUTERS = {
    "expert": lambda: ExpertChoiceRouter(capacities=[1.0, 0.75, 0.5, 0.25]),
    "expert_segment": lambda: ExpertChoiceRouter(unit="segment", capacities=[1.0, 0.75, 0.5, 0.25]),
    "token_choice": lambda: TokenChoiceRouter(capacities=[1.0, 0.75, 0.5, 0.25]),
    "expert_threshold": lambda: ExpertChoiceRouter(inference="threshold",
                                                   capacities=[1.0, 0.75, 0.5, 0.25]),
}


@pytest.mark.parametrize("kv_mode", ["recursion", "shared"])
@pytest.mark.parametrize("kind", list(ROUTERS))
@pytest.mark.parametrize("already_padded", [False, True], ids=["full", "padded"])
def test_padding_invariance(kind, kv_mode, already_padded):
    model = build(ROUTERS[kind](), R=4, sharing="middle_cycle", kv_mode=kv_mode).eval()
    if kind == "token_choice":
        with torch.no_grad():
            model.router.proj.weight.mul_(30)
    sizes = [[2, 1, 3, 2, 2, 2], [1] * 12, [4, 4, 4], [3, 3, 2, 2, 1, 1]]
    tokens = make_tokens(N=12, seg_sizes=sizes if kind == "expert_segment" else None,
                         lengths=[12, 9, 5, 1] if already_padded else None)
    base = model(tokens)
    for extra in (1, 7):
        padded = pad_tokens(tokens, extra)
        out = model(padded)
        N = tokens.embeddings.shape[1]
        torch.testing.assert_close(out.hidden[:, :N][valid_of(tokens)],
                                   base.hidden[valid_of(tokens)], **TOL)
        assert torch.equal(out.depth[:, :N], base.depth)
        assert (out.depth[:, N:] == 0).all()
        assert not any(s.selected[:, N:].any() for s in out.steps)
        check_hierarchy(out, padded.valid)
