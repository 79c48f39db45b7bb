import pytest
import torch

from encoders import VideoTokenizer

DIM = 16


def clip(T=4, H=16, W=24, B=2):
    return torch.rand(B, T, 3, H, W)


@pytest.mark.parametrize(
    "tubelet,patch,T,H,W", [(2, 16, 16, 32, 32), (2, 8, 4, 16, 24), (1, 8, 3, 8, 16)]
)
@pytest.mark.parametrize("segment", ["slice", "tube", "token"])
def test_shapes_counts_and_segments(tubelet, patch, T, H, W, segment):
    tok = VideoTokenizer(DIM, patch_size=patch, tubelet_size=tubelet, segment=segment)
    out = tok(clip(T, H, W))
    n, h, w = T // tubelet, H // patch, W // patch
    N = n * h * w
    assert out.embeddings.shape == (2, N, DIM)
    assert out.positions.shape == (2, N, 3) and out.regions.shape == (2, N, 3, 2)
    assert out.axes == ("time", "height", "width")
    assert out.padding_mask is None
    assert out.modality_ids.unique().tolist() == [1]
    t_idx, r_idx, c_idx = out.positions[0].long().unbind(-1)
    assert torch.equal(t_idx * h * w + r_idx * w + c_idx, torch.arange(N))  # (time, row, col)
    seg = out.segment_ids[0]
    expected = {"slice": t_idx, "tube": r_idx * w + c_idx, "token": torch.arange(N)}[segment]
    assert torch.equal(seg, expected)
    counts = torch.bincount(seg, minlength=out.num_segments)
    assert len(counts) == out.num_segments and counts.min() > 0  # ids fill [0, num_segments)
    assert counts.max() == out.max_segment_len
    assert isinstance(out.num_segments, int) and isinstance(out.max_segment_len, int)
    # The flag says what the ids do: segment u is the u-th run of max_segment_len tokens.
    L = out.max_segment_len
    blocks = out.num_segments * L == N and torch.equal(seg, torch.arange(N) // L)
    assert out.contiguous_segments == blocks == (segment != "tube")


def test_marked_region_maps_back_to_frames_and_pixels():
    torch.manual_seed(0)
    fps, t, p = 10.0, 2, 8
    tok = VideoTokenizer(DIM, patch_size=p, tubelet_size=t, frame_rate=fps).eval()
    video = clip(T=8, H=24, W=32, B=1)
    marked = video.clone()
    marked[:, 5, :, 3:10, 20:22] = 0.0  # frame 5 (slice 2), rows 3..9, cols 20..21
    a, b = tok(video), tok(marked)
    hit = (a.embeddings - b.embeddings).abs().amax(-1)[0] > 1e-5
    recon = torch.zeros(8, 24, 32, dtype=torch.bool)  # (frames, rows, cols)
    for (t0, t1), (r0, r1), (c0, c1) in b.regions[0, hit].tolist():
        recon[round(t0 * fps):round(t1 * fps), int(r0):int(r1), int(c0):int(c1)] = True
    expected = torch.zeros(8, 24, 32, dtype=torch.bool)
    expected[4:6, 0:16, 16:24] = True  # the block snapped to tubelets
    assert torch.equal(recon, expected)
    assert sorted(map(tuple, b.positions[0, hit].long().tolist())) == [(2, 0, 2), (2, 1, 2)]
    assert b.segment_ids[0, hit].unique().tolist() == [2]  # one tubelet time slice


def test_time_regions_in_seconds():
    tok = VideoTokenizer(DIM, patch_size=8, tubelet_size=2, frame_rate=25.0)
    out = tok(clip(T=6, H=8, W=8, B=1))
    torch.testing.assert_close(out.regions[0, :, 0, 0], torch.tensor([0.0, 0.08, 0.16]))
    torch.testing.assert_close(out.regions[0, :, 0, 1], torch.tensor([0.08, 0.16, 0.24]))


def test_learned_positions_crop_in_time():
    torch.manual_seed(0)
    tok = VideoTokenizer(DIM, patch_size=8, learned_pos_grid=(4, 2, 2)).eval()
    long = clip(T=8, H=16, W=16, B=1)
    short = long[:, :4]
    # cropping the time table: the short clip's tokens equal the long clip's first slices
    torch.testing.assert_close(tok(short).embeddings, tok(long).embeddings[:, :8])


@pytest.mark.parametrize(
    "shape,match",
    [
        ((4, 3, 16, 16), r"\(B, T, C=3, H, W\), got \(4, 3, 16, 16\)"),
        ((1, 3, 3, 16, 16), r"multiple of tubelet_size=2, got T=3"),
        ((1, 4, 3, 16, 20), r"multiples of patch_size=8, got \(H, W\) = \(16, 20\)"),
        ((1, 4, 1, 16, 16), r"C=3"),
    ],
)
def test_bad_input_names_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        VideoTokenizer(DIM, patch_size=8)(torch.rand(shape))


def test_bad_segment_name():
    with pytest.raises(ValueError, match="segment must be one of"):
        VideoTokenizer(DIM, segment="frame")
