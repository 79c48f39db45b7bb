"""Parameter sharing: schedules, plans, unique parameter counts and real weight tying."""

import pytest
import torch

from encoders.tokens import Tokens
from mormm.backbone import (
    STRATEGIES,
    BackboneConfig,
    MoRBackbone,
    layer_schedule,
    num_unique_layers,
    sharing_plan,
)
from mormm.backbone.layers import Block

DIM, HEADS = 32, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: one intra-op thread is as fast, and immune to OpenMP spin-waiting when the
    # host is busy (2 threads ran these tests up to 10x slower under load).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def make_tokens(B=2, N=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Tokens(
        embeddings=torch.randn(B, N, DIM, generator=g),
        positions=torch.rand(B, N, 2, generator=g) * 8,
        segment_ids=Tokens.default_segments(B, N),
        modality_ids=torch.zeros(B, N, dtype=torch.long),
    )


# L=9, N_r=3 as documented in DESIGN.md section 1 / sharing.py. The middle strategies share the
# L-2 middle layers, which for L=9 is 7 (not a multiple of 3): they are checked at L=11.
SCHEDULES = {
    ("none", 9, 3): [0, 1, 2, 3, 4, 5, 6, 7, 8],
    ("cycle", 9, 3): [0, 1, 2, 0, 1, 2, 0, 1, 2],
    ("sequence", 9, 3): [0, 0, 0, 1, 1, 1, 2, 2, 2],
    ("middle_cycle", 11, 3): [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4],
    ("middle_sequence", 11, 3): [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4],
    ("middle_cycle", 5, 3): [0, 1, 1, 1, 2],
    ("cycle", 8, 4): [0, 1, 0, 1, 0, 1, 0, 1],
    ("sequence", 8, 4): [0, 0, 0, 0, 1, 1, 1, 1],
    ("middle_sequence", 10, 4): [0, 1, 1, 1, 1, 2, 2, 2, 2, 3],
}

# Every (strategy, L, N_r) the tests below build models for.
VALID = [("none", 6, 3), ("cycle", 6, 3), ("sequence", 6, 3), ("middle_cycle", 8, 3),
         ("middle_sequence", 8, 3), ("cycle", 4, 4), ("middle_cycle", 5, 3)]


@pytest.mark.parametrize("key", list(SCHEDULES), ids=lambda k: f"{k[0]}-L{k[1]}-R{k[2]}")
def test_layer_schedule_patterns(key):
    assert layer_schedule(*key) == SCHEDULES[key]
    assert num_unique_layers(*key) == len(set(SCHEDULES[key]))


@pytest.mark.parametrize("strategy", ["middle_cycle", "middle_sequence"])
def test_middle_strategies_reject_L9_R3(strategy):
    # 7 middle layers cannot be cut into 3 equal recursion blocks.
    with pytest.raises(ValueError, match="num_layers=9"):
        layer_schedule(strategy, 9, 3)


def test_sharing_plan_chunks():
    p = sharing_plan("cycle", 9, 3)
    assert (p.prelude, p.steps, p.coda, p.num_weights) == ((), ((0, 1, 2),) * 3, (), 3)
    p = sharing_plan("sequence", 9, 3)
    assert p.steps == ((0, 0, 0), (1, 1, 1), (2, 2, 2)) and p.num_weights == 3
    p = sharing_plan("middle_cycle", 11, 3)
    assert (p.prelude, p.steps, p.coda, p.num_weights) == ((0,), ((1, 2, 3),) * 3, (4,), 5)
    p = sharing_plan("middle_sequence", 11, 3)
    assert p.steps == ((1, 1, 1), (2, 2, 2), (3, 3, 3)) and (p.prelude, p.coda) == ((0,), (4,))
    p = sharing_plan("none", 9, 3)
    assert p.steps == ((0, 1, 2), (3, 4, 5), (6, 7, 8)) and p.num_weights == 9


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("L,R", [(6, 2), (8, 2), (12, 3), (12, 4), (12, 12), (14, 4)])
def test_plan_reassembles_schedule(strategy, L, R):
    try:
        schedule = layer_schedule(strategy, L, R)
    except ValueError:
        span = L - 2 if strategy.startswith("middle_") else L
        assert span % R or span < R  # rejected only when the shared span does not split
        return
    plan = sharing_plan(strategy, L, R)
    flat = [*plan.prelude, *(i for chunk in plan.steps for i in chunk), *plan.coda]
    assert flat == schedule
    assert len(plan.steps) == R and len({len(c) for c in plan.steps}) == 1
    assert plan.num_weights == num_unique_layers(strategy, L, R) == max(schedule) + 1
    assert sorted(set(schedule)) == list(range(plan.num_weights))  # weights numbered densely


@pytest.mark.parametrize("strategy,L,R", VALID)
def test_unique_parameter_count(strategy, L, R):
    cfg = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L, num_recursions=R, sharing=strategy)
    model = MoRBackbone(cfg)
    per_layer = sum(p.numel() for p in Block(DIM, HEADS).parameters())
    unique = num_unique_layers(strategy, L, R)
    assert len(model.layers) == unique
    assert sum(p.numel() for p in model.layers.parameters()) == unique * per_layer
    # The whole backbone: the unique layers and the final norm, nothing else (no router here).
    assert sum(p.numel() for p in model.parameters()) == unique * per_layer + 2 * DIM
    # No accidental tying between distinct weight indices either.
    ptrs = [p.data_ptr() for p in model.layers.parameters()]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("strategy,L,R", VALID)
def test_each_shared_layer_runs_where_the_schedule_says(strategy, L, R):
    cfg = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L, num_recursions=R, sharing=strategy)
    model = MoRBackbone(cfg).eval()
    calls = [0] * len(model.layers)
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(make_tokens())
    schedule = layer_schedule(strategy, L, R)
    assert calls == [schedule.count(i) for i in range(len(model.layers))]


@pytest.mark.parametrize("strategy,L,R", [v for v in VALID if v[0] != "none"])
def test_shared_weights_are_tied_through_training(strategy, L, R):
    """A shared model equals an untied L-layer stack holding copies of the scheduled layers; the
    shared layer's gradient is the sum of its copies' gradients (one object, not re-created
    modules: the pitfall of the official code's issue #17), and tying survives an optimizer step."""
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L, num_recursions=R, sharing=strategy)
    shared = MoRBackbone(cfg)
    schedule = layer_schedule(strategy, L, R)
    untied = MoRBackbone(BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L, num_recursions=1,
                                        sharing="none"))
    for k, i in enumerate(schedule):
        untied.layers[k].load_state_dict(shared.layers[i].state_dict())
    untied.norm.load_state_dict(shared.norm.state_dict())

    tokens = make_tokens()
    w = torch.randn(tokens.embeddings.shape)  # hidden.sum() has zero gradient through the norm
    out_s, out_u = shared(tokens).hidden, untied(tokens).hidden
    torch.testing.assert_close(out_s, out_u, atol=1e-5, rtol=1e-5)
    (out_s * w).sum().backward()
    (out_u * w).sum().backward()
    for i, layer in enumerate(shared.layers):
        copies = [untied.layers[k] for k, s in enumerate(schedule) if s == i]
        for name, p in layer.named_parameters():
            expected = sum(dict(c.named_parameters())[name].grad for c in copies)
            torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4)

    before = {id(p) for p in shared.parameters()}
    opt = torch.optim.AdamW(shared.parameters(), lr=1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(before)  # each shared tensor once
    opt.step()
    assert {id(p) for p in shared.parameters()} == before  # updated in place, still the same objects
    assert not torch.allclose(shared(tokens).hidden, out_s)  # and the step did change them
