"""Depth-wise batching: a stream of batches through DepthwiseBatcher gives each batch the output of
its own forward, while every shared layer runs once per call over all the batches in flight."""

from __future__ import annotations

import pytest
import torch

from helpers import on_device, random_tokens, randomize_router
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone, TokenChoiceRouter
from mormm.backbone import depthwise, fused
from mormm.backbone.depthwise import DepthwiseBatcher
from mormm.backbone.layers import PackedRows, PrefixKeys
from mormm.backbone.units import capacity_count

CAPS = [1.0, 0.75, 0.5, 0.25]


def _backbone(router=None, sharing="cycle", kv_mode="recursion", gate_update="delta",
              caps=CAPS, **router_kw):
    layers = 10 if sharing.startswith("middle") else 8
    cfg = BackboneConfig(dim=32, num_heads=2, num_layers=layers, num_recursions=4,
                         sharing=sharing, kv_mode=kv_mode, gate_update=gate_update)
    torch.manual_seed(0)
    if router == "ec":
        router = ExpertChoiceRouter(caps, **router_kw)
    elif router == "tc":
        router = TokenChoiceRouter(caps, **router_kw)
    backbone = MoRBackbone(cfg, router)
    randomize_router(backbone)
    return backbone.eval()


def _stream(segments=None, contiguous=False, device="cpu"):
    """Five batches of different sizes and lengths (whole segments of 4 tokens when segmented)."""
    sizes = [(2, 12), (3, 16), (1, 24), (2, 12), (4, 8)]
    out = []
    for seed, (B, N) in enumerate(sizes):
        t = random_tokens(B, N, 32, segments=segments, seed=seed)
        out.append(on_device(t, device).replace(contiguous_segments=contiguous))
    return out


CASES = {
    "plain recursion": dict(),
    "plain middle_cycle": dict(sharing="middle_cycle"),
    "expert-choice per token": dict(router="ec"),
    "expert-choice middle_cycle": dict(router="ec", sharing="middle_cycle"),
    "expert-choice output update, tanh gate": dict(router="ec", gate_update="output",
                                                   activation="tanh"),
    "expert-choice per segment (blocks)": dict(router="ec", unit="segment"),
    "expert-choice per segment (ids)": dict(router="ec", unit="segment"),
    "token-choice per token": dict(router="tc"),
    "token-choice per segment (blocks)": dict(router="tc", unit="segment"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_stream_gets_each_batch_its_own_forward(case):
    backbone = _backbone(**CASES[case])
    segmented = "segment" in case
    batches = _stream(segments=4 if segmented else None, contiguous="blocks" in case)
    with torch.inference_mode():
        expected = [backbone(t) for t in batches]
        got = list(DepthwiseBatcher(backbone).run(batches))
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.hidden.shape == e.hidden.shape
        torch.testing.assert_close(g.hidden, e.hidden, atol=1e-5, rtol=1e-5)
        assert torch.equal(g.depth, e.depth)
        assert len(g.steps) == len(e.steps) == 4
        for ge, gg in zip(e.steps, g.steps):
            assert torch.equal(gg.selected, ge.selected)
            if ge.logits is not None:
                torch.testing.assert_close(gg.logits, ge.logits, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(gg.gate, ge.gate, atol=1e-6, rtol=1e-5)
    if CASES[case].get("router"):  # routing skipped compute: depths 1..4 all occur
        assert set(torch.cat([g.depth.flatten() for g in got]).tolist()) == {1, 2, 3, 4}
    if CASES[case].get("router") == "tc":  # and some steps kept fewer than their bound
        assert any(not s.selected.all() and s.selected.sum() < e.depth.numel() * c
                   for e in expected for s, c in zip(e.steps[1:], CAPS[1:]))


def test_each_call_runs_every_shared_layer_once_over_the_batches_in_flight():
    backbone = _backbone(router="ec")
    calls = []
    for layer in backbone.layers:
        layer.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    batches = _stream()
    batcher = DepthwiseBatcher(backbone)
    outs = []
    with torch.no_grad():
        for i, t in enumerate(batches):
            calls.clear()
            outs.append(batcher(t))
            assert batcher.in_flight == min(i + 1, 3)  # the oldest leaves after its 4th step
            # One call per shared layer, over the packed rows of every batch in flight: the batch
            # admitted j calls ago brings its B * capacity_count(CAPS[j], N) rows to step j.
            flight = list(reversed(batches[max(0, i - 3): i + 1]))
            rows = sum(b.embeddings.shape[0] * capacity_count(CAPS[j], b.embeddings.shape[1])
                       for j, b in enumerate(flight))
            shape = (1, rows, 32) if len(flight) > 1 else tuple(batches[0].embeddings.shape)
            assert calls == [shape, shape], i
        assert [o is None for o in outs] == [True, True, True, False, False]
        rest = batcher.flush()
        assert len(rest) == 3 and batcher.in_flight == 0
        assert batcher() is None  # nothing in flight, nothing admitted


@pytest.mark.parametrize("make, match", [
    (lambda: _backbone(sharing="none"), "same shared layers"),
    (lambda: _backbone(sharing="sequence"), "same shared layers"),
    (lambda: _backbone(router="ec", kv_mode="shared"), "kv_mode='recursion'"),
])
def test_backbones_it_cannot_batch_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        DepthwiseBatcher(make())


def test_batches_and_modes_it_cannot_run_are_named():
    backbone = _backbone(router="ec")
    batcher = DepthwiseBatcher(backbone)
    assert batcher.refusal(random_tokens(2, 12, 32)) is None
    assert "padded" in batcher.refusal(random_tokens(2, 12, 32, lengths=[12, 9]))
    with torch.no_grad(), pytest.raises(ValueError, match="padded"):
        batcher(random_tokens(2, 12, 32, lengths=[12, 9]))
    threshold = DepthwiseBatcher(_backbone(router="ec", inference="threshold"))
    with torch.no_grad(), pytest.raises(ValueError, match="inference='threshold'"):
        threshold(random_tokens(2, 12, 32))
    for router in ("ec", "tc"):  # 14 tokens in segments of 4: the last segment holds 2
        segments = DepthwiseBatcher(_backbone(router=router, unit="segment"))
        assert segments.refusal(random_tokens(2, 14, 32, segments=4)) == (
            "its 14 tokens do not fill its 4 segments of 4 (Tokens.num_segments x "
            "max_segment_len)")
        assert segments.refusal(random_tokens(2, 16, 32, segments=4)) is None
    with pytest.raises(RuntimeError, match="inference_mode"):
        batcher(random_tokens(2, 12, 32))  # gradients on
    backbone.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="eval"):
        batcher(random_tokens(2, 12, 32))
    assert batcher.in_flight == 0  # nothing was admitted by the failed calls


def test_offer_admits_what_it_can_and_builds_each_batchs_routing_units_once(monkeypatch):
    """offer(tokens), as mormm predict and evaluation call it for a stream that may hold padded
    batches: an admitted batch's routing units are built once (segments found by id cost
    launches) and its outputs are batcher(tokens)'s; a refused one is named, admits nothing and
    runs nothing."""
    backbone = _backbone(router="ec", unit="segment")
    built = []
    real = MoRBackbone._units
    monkeypatch.setattr(MoRBackbone, "_units", lambda self, t: built.append(t) or real(self, t))
    stream = _stream(segments=4)
    padded = random_tokens(2, 12, 32, lengths=[12, 9])
    offered, called = DepthwiseBatcher(backbone), DepthwiseBatcher(backbone)
    with torch.no_grad():
        for i, tokens in enumerate(stream):
            why, out = offered.offer(tokens)
            assert why is None and built == [tokens]
            built.clear()
            expected = called(tokens)
            assert (out is None) == (expected is None)
            if out is not None:
                torch.testing.assert_close(out.hidden, expected.hidden, rtol=0, atol=0)
            if i == 1:  # a padded batch mid-stream: refused, nothing admitted or run
                before = offered.in_flight, [b.step for b in offered._flight]
                why, out = offered.offer(padded)
                assert "padded" in why and out is None
                assert (offered.in_flight, [b.step for b in offered._flight]) == before
            built.clear()
        for out, expected in zip(offered.flush(), called.flush(), strict=True):
            torch.testing.assert_close(out.hidden, expected.hidden, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inference_mode"):
        offered.offer(stream[0])  # gradients on: an error, not a refusal


def test_packed_rows_give_every_sequence_its_offsets():
    """The offsets flash varlen reads on CUDA: b sequences of n rows per group, end to end."""
    keys = PackedRows.of(((2, 3), (1, 5), (3, 1)), torch.device("cpu"))
    assert keys.cu_seqlens.tolist() == [0, 3, 6, 11, 12, 13, 14]
    assert keys.cu_seqlens.dtype == torch.int32
    # A token-choice step's group splits each row into its taken slots and its padding slots.
    prefix = PrefixKeys.of(torch.tensor([[True, True, False], [True, False, False]]))
    keys = PackedRows.of(((1, 2), (2, 3)), torch.device("cpu"), (None, prefix))
    assert keys.cu_seqlens.tolist() == [0, 2, 4, 5, 6, 8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen runs on CUDA only")
@pytest.mark.parametrize("router", ["ec", "tc"])
def test_packed_steps_run_as_one_flash_varlen_call_on_cuda_under_bf16(monkeypatch, router):
    """Under bf16 autocast on CUDA the packed rows attend through flash attention's
    variable-length kernel, one call per layer over every clip in flight (token-choice: two
    sequences per clip from its second step on, its taken slots and its padding); a stream still
    gets each batch's forward."""
    backbone = _backbone(router=router).cuda()
    batches = _stream(device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = [backbone(t) for t in batches]
        sequences = []
        real = torch.ops.aten._flash_attention_forward

        def spy(*args, **kwargs):
            sequences.append(args[3].numel() - 1)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", spy)
        got = list(DepthwiseBatcher(backbone).run(batches))
    # Each call: two layers, each one varlen call over the clips in flight (batch i takes step
    # t - i at call t), a token-choice clip past step 0 as two sequences (its taken slots, its
    # padding). A call with one batch in flight runs the forward's attention: varlen only for
    # token-choice's padded steps.
    sizes = [t.embeddings.shape[0] for t in batches]
    per_call = []
    for t in range(len(sizes) + 3):
        flight = [(b, t - i) for i, b in enumerate(sizes) if i <= t < i + 4]
        seqs = sum(b * (2 if router == "tc" and step > 0 else 1) for b, step in flight)
        if len(flight) > 1 or (router == "tc" and flight[0][1] > 0):
            per_call += [seqs, seqs]
    assert sequences == per_call
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.hidden.float(), e.hidden.float(), atol=3e-2, rtol=3e-2)
        assert (g.depth != e.depth).float().mean() < 0.05  # bf16 rounding may flip close calls


def test_the_callers_embeddings_are_never_written():
    """Without a prelude layer, a first step below capacity 1 gathers straight from the caller's
    embeddings: the scatter back at the end must copy them, not write into them."""
    backbone = _backbone(router="ec", caps=[0.75, 0.5, 0.5, 0.25])
    batches = _stream()
    before = [t.embeddings.clone() for t in batches]
    with torch.no_grad():
        expected = [backbone(t) for t in batches]
        got = list(DepthwiseBatcher(backbone).run(batches))
    assert all(torch.equal(t.embeddings, b) for t, b in zip(batches, before))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.hidden, e.hidden, atol=1e-5, rtol=1e-5)
        # step 2 keeps all that step 1 kept (no depth 2): a later step without a gather
        assert torch.equal(g.depth, e.depth) and set(g.depth.unique().tolist()) == {0, 1, 3, 4}


FUSED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not fused.runs_on(torch.zeros(1, device=FUSED_DEVICE)),
                    reason="needs Triton (its interpreter on CPU, tests/conftest.py)")
def test_steps_end_in_the_fused_merge_which_scores_the_next_step(monkeypatch):
    """At inference where the Triton kernels run (the GPU's, else Triton's interpreter), every
    batch's step ends in one merge_rows launch, which also computes the next expert-choice
    router's scores: routes after the first get them instead of scoring the rows again. The
    merges write each batch's rows into its sequence, so no batch keeps its working sets for a
    scatter back."""
    backbone = _backbone(router="ec").to(FUSED_DEVICE)
    merges, given, scatters = [], [], []
    monkeypatch.setattr(depthwise, "scatter_blocks", lambda *a, **k: scatters.append(1))
    real_merge, real_route = fused.merge_rows, ExpertChoiceRouter.route
    monkeypatch.setattr(fused, "merge_rows",
                        lambda *a, **k: merges.append(1) or real_merge(*a, **k))
    monkeypatch.setattr(ExpertChoiceRouter, "route", lambda self, step, h, units, active, carry,
                        scores=None, fused=False: given.append((step, scores is not None))
                        or real_route(self, step, h, units, active, carry, scores, fused))
    batches = _stream(device=FUSED_DEVICE)
    with torch.no_grad():
        expected = [backbone(t) for t in batches]
        merges.clear(), given.clear()
        got = list(DepthwiseBatcher(backbone).run(batches))
    assert len(merges) == 4 * len(batches) and not scatters
    assert sorted(given) == sorted((r, r > 0) for r in range(4) for _ in batches)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.hidden, e.hidden, atol=1e-5, rtol=1e-5)
        assert torch.equal(g.depth, e.depth)
