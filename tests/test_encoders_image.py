import pytest
import torch

from encoders import ImageTokenizer, Tokens

DIM = 16


def changed(a: Tokens, b: Tokens, tol: float = 1e-5) -> torch.Tensor:
    """(B, N) bool: tokens whose embedding differs between two runs."""
    return (a.embeddings - b.embeddings).abs().amax(-1) > tol


@pytest.mark.parametrize("patch,H,W", [(16, 32, 48), (8, 24, 16), (4, 4, 4)])
def test_shapes_and_counts(patch, H, W):
    tok = ImageTokenizer(DIM, patch_size=patch)
    out = tok(torch.rand(2, 3, H, W))
    h, w = H // patch, W // patch
    N = h * w
    assert out.embeddings.shape == (2, N, DIM)
    assert out.positions.shape == (2, N, 2) and out.regions.shape == (2, N, 2, 2)
    assert out.axes == ("height", "width")
    assert out.padding_mask is None
    assert out.num_segments == N and out.max_segment_len == 1
    assert out.segment_ids[0].tolist() == list(range(N))
    assert out.modality_ids.unique().tolist() == [2]
    # row-major grid: token i sits at (i // w, i % w)
    idx = torch.arange(N)
    assert torch.equal(out.positions[1], torch.stack((idx // w, idx % w), -1).float())
    assert torch.equal(out.regions[..., 0], out.positions * patch)
    assert torch.equal(out.regions[..., 1], (out.positions + 1) * patch)


def test_marked_region_reconstructed_from_positions():
    torch.manual_seed(0)
    p = 8
    tok = ImageTokenizer(DIM, patch_size=p).eval()
    img = torch.rand(1, 3, 32, 40)
    marked = img.clone()
    marked[:, :, 9:20, 17:24] = 1.0  # rows 9..19, cols 17..23 -> patch rows 1-2, cols 2
    a, b = tok(img), tok(marked)
    hit = changed(a, b)[0]
    # Paint every changed token's pixel region and compare with the block snapped to patches.
    recon = torch.zeros(32, 40, dtype=torch.bool)
    for (r0, r1), (c0, c1) in b.regions[0, hit].long().tolist():
        recon[r0:r1, c0:c1] = True
    expected = torch.zeros(32, 40, dtype=torch.bool)
    expected[8:24, 16:24] = True
    assert torch.equal(recon, expected)
    assert sorted(map(tuple, b.positions[0, hit].long().tolist())) == [(1, 2), (2, 2)]


def test_learned_positions_crop_and_interpolate():
    torch.manual_seed(0)
    tok = ImageTokenizer(DIM, patch_size=4, learned_pos_grid=(3, 3)).eval()
    plain = ImageTokenizer(DIM, patch_size=4).eval()
    plain.patch_embed.load_state_dict(tok.patch_embed.state_dict())
    small, big = torch.rand(1, 3, 8, 12), torch.rand(1, 3, 20, 20)
    # smaller grid (2, 3): the added embedding is the cropped tables' sum
    added = tok(small).embeddings - plain(small).embeddings  # (1, 6, D)
    rows, cols = tok.pos_embed.tables
    expected = (rows[:2, None] + cols[None, :3]).reshape(6, DIM)
    torch.testing.assert_close(added[0], expected)
    # larger grid (5, 5): interpolated tables that keep both end points of the trained ones
    added = (tok(big).embeddings - plain(big).embeddings)[0].reshape(5, 5, DIM)
    torch.testing.assert_close(added[0, 0], rows[0] + cols[0])
    torch.testing.assert_close(added[4, 4], rows[2] + cols[2])
    assert tok(big).positions.amax().item() == 4


@pytest.mark.parametrize(
    "shape,match",
    [
        ((3, 32, 32), r"\(B, C=3, H, W\), got \(3, 32, 32\)"),
        ((2, 1, 32, 32), r"\(B, C=3, H, W\), got \(2, 1, 32, 32\)"),
        ((2, 3, 30, 32), r"multiples of patch_size=16, got \(H, W\) = \(30, 32\)"),
    ],
)
def test_bad_input_names_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        ImageTokenizer(DIM)(torch.rand(shape))


def test_bad_config():
    with pytest.raises(ValueError, match="mean/std"):
        ImageTokenizer(DIM, mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(ValueError, match="one size per position axis"):
        ImageTokenizer(DIM, learned_pos_grid=(4,))
