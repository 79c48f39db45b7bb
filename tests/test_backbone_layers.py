"""Transformer layer and rotary embeddings: timm ViT Block parity, masking, KV reuse, RoPE."""

import pytest
import torch
from timm.models.vision_transformer import Block as TimmBlock

from encoders.tokens import Tokens
from mormm.backbone import BackboneConfig, MoRBackbone
from mormm.backbone.layers import Block
from mormm.backbone.rotary import AxialRotary, apply_rotary

DIM, HEADS = 32, 4
TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (LayerNorm affine and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):  # scales near 1 keep the stack well conditioned
                m.weight.add_(1.0)


def make_tokens(B=2, N=9, A=2, seed=0, padding_mask=None):
    g = torch.Generator().manual_seed(seed)
    return Tokens(
        embeddings=torch.randn(B, N, DIM, generator=g),
        positions=torch.rand(B, N, A, generator=g) * 10,
        segment_ids=Tokens.default_segments(B, N),
        modality_ids=torch.zeros(B, N, dtype=torch.long),
        padding_mask=padding_mask,
    )


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_block_matches_timm_vit_block(drop_path):
    ours = Block(DIM, HEADS, mlp_ratio=4.0, qkv_bias=True, drop_path=drop_path).eval()
    ref = TimmBlock(DIM, HEADS, mlp_ratio=4.0, qkv_bias=True, drop_path=drop_path).eval()
    randomize(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same parameter names and shapes
    x = torch.randn(3, 11, DIM)
    out, kv = ours(x)
    torch.testing.assert_close(out, ref(x), **TOL)
    if drop_path:  # training: the same samples dropped from the same random draws
        ours.train(), ref.train()
        torch.manual_seed(1)
        dropped = ours(x)[0]
        torch.manual_seed(1)
        torch.testing.assert_close(dropped, ref(x), **TOL)
        assert not torch.allclose(dropped, out)
        ours.eval()
    k, v = kv
    assert k.shape == v.shape == (3, HEADS, 11, DIM // HEADS)
    # An all-True key mask is the unmasked computation.
    all_keys = torch.ones(3, 11, dtype=torch.bool)
    torch.testing.assert_close(ours(x, key_valid=all_keys)[0], out, **TOL)


def test_vanilla_backbone_matches_timm_stack():
    L = 4
    cfg = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L, num_recursions=2, sharing="none",
                         rope_axes=0)
    model = MoRBackbone(cfg, router=None).eval()
    blocks = [TimmBlock(DIM, HEADS, qkv_bias=True).eval() for _ in range(L)]
    final = torch.nn.LayerNorm(DIM, eps=1e-6)
    for i, b in enumerate(blocks):
        randomize(b, seed=i)
        model.layers[i].load_state_dict(b.state_dict(), strict=True)
    randomize(final, seed=99)
    model.norm.load_state_dict(final.state_dict())

    tokens = make_tokens(B=3, N=13)
    out = model(tokens)
    ref = tokens.embeddings
    for b in blocks:
        ref = b(ref)
    torch.testing.assert_close(out.hidden, final(ref), **TOL)
    assert torch.equal(out.depth, torch.full((3, 13), 2))  # every token takes both steps
    assert out.aux_loss.item() == 0 and out.losses == {} and out.stats == {}


def test_key_mask_equals_dropping_masked_tokens():
    block = Block(DIM, HEADS).eval()
    randomize(block, seed=1)
    x = torch.randn(2, 10, DIM)
    keep = torch.rand(2, 10, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[:, 0] = True
    out, _ = block(x, key_valid=keep)
    for b in range(2):
        sub, _ = block(x[b : b + 1, keep[b]])
        torch.testing.assert_close(out[b, keep[b]], sub[0], **TOL)


@pytest.mark.parametrize("rope", [False, True])
def test_attend_to_own_kv_equals_self_attention(rope):
    """Recursive KV sharing path (query slice of the fused qkv only) against self-attention."""
    block = Block(DIM, HEADS).eval()
    randomize(block, seed=2)
    x = torch.randn(2, 7, DIM)
    table = AxialRotary(DIM // HEADS, 2)(torch.rand(2, 7, 2) * 5) if rope else None
    out, kv = block(x, table)
    torch.testing.assert_close(block(x, table, kv=kv)[0], out, **TOL)
    # Queries of a subset attending to the full K/V = full attention restricted to those queries.
    idx = torch.tensor([1, 4, 5])
    sub, none = block(x[:, idx], None if table is None else table[:, idx], kv=kv)
    assert none is None
    torch.testing.assert_close(sub, out[:, idx], **TOL)


def test_rope_at_position_zero_is_identity():
    block = Block(DIM, HEADS).eval()
    randomize(block, seed=4)
    x = torch.randn(2, 6, DIM)
    table = AxialRotary(DIM // HEADS, 3)(torch.zeros(2, 6, 3))
    torch.testing.assert_close(block(x, table)[0], block(x)[0], **TOL)


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_rope_scores_depend_on_relative_position_only(axes):
    head_dim = 16
    rot = AxialRotary(head_dim, axes, theta=100.0)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 5, 2, head_dim, generator=g), torch.randn(1, 5, 2, head_dim, generator=g)
    pos = torch.rand(1, 5, axes, generator=g) * 20
    shift = torch.rand(1, 1, axes, generator=g) * 50

    def scores(p):  # (B, H, K, K) attention logits of tokens-first q, k (B, K, H, Dh)
        table = rot(p)
        rq, rk = apply_rotary(q, table).transpose(1, 2), apply_rotary(k, table).transpose(1, 2)
        return rq @ rk.transpose(-1, -2)

    torch.testing.assert_close(scores(pos), scores(pos + shift), atol=1e-4, rtol=1e-4)
    # ... and do depend on relative position along every axis.
    for a in range(axes):
        moved = pos.clone()
        moved[0, 0, a] += 1.0
        assert not torch.allclose(scores(pos), scores(moved), atol=1e-3)
    torch.testing.assert_close(apply_rotary(q, rot(pos)).norm(dim=-1), q.norm(dim=-1), **TOL)


def test_rotary_table_rotates_each_pair_by_its_axis_angle():
    """The fused table form equals the textbook half-split rotation (x1, x2) -> (x1 cos - x2 sin,
    x1 sin + x2 cos) with angle position[axis of pair] * inv_freq[pair]."""
    rot = AxialRotary(head_dim=12, num_axes=2, theta=50.0)
    g = torch.Generator().manual_seed(6)
    pos = torch.rand(2, 4, 2, generator=g) * 9
    x = torch.randn(2, 4, 3, 12, generator=g)  # (B, K, H, Dh)
    angle = pos[..., rot.axis_of_pair] * rot.inv_freq  # (B, K, P)
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
    x1, x2 = x.chunk(2, -1)
    expected = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)
    torch.testing.assert_close(apply_rotary(x, rot(pos)), expected, **TOL)


def test_rope_splits_pairs_evenly_between_axes():
    rot = AxialRotary(head_dim=14, num_axes=3)  # 7 pairs -> 3, 2, 2
    assert rot.axis_of_pair.tolist() == [0, 0, 0, 1, 1, 2, 2]
    # Fewer position axes than rotated axes: the missing ones count as position 0.
    p = torch.rand(1, 4, 2)
    full = torch.cat((p, torch.zeros(1, 4, 1)), -1)
    torch.testing.assert_close(rot(p), rot(full))
    with pytest.raises(ValueError, match="rope_axes"):
        rot(torch.rand(1, 4, 4))


def test_backbone_rope_uses_token_positions():
    cfg = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=2, num_recursions=1, sharing="none",
                         rope_axes=2)
    model = MoRBackbone(cfg).eval()
    t = make_tokens()
    base = model(t).hidden
    shifted = model(t.replace(positions=t.positions + torch.tensor([3.0, -2.0]))).hidden
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)  # translation invariant
    swapped = t.positions.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    assert not torch.allclose(model(t.replace(positions=swapped)).hidden, base, atol=1e-4)
