import math
import warnings

import pytest
import torch

from encoders import AudioTokenizer

DIM, SR, WIN, HOP = 16, 16000, 400, 160
FRONTENDS = ["mel", "kaldi"]
LAYOUTS = [dict(layout="patches"), dict(layout="frames", frames_per_token=4)]


def noise(*shape, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g)


def frames_in(samples: int) -> int:
    return 1 + (samples - WIN) // HOP


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["patches", "frames"])
@pytest.mark.parametrize("seconds", [1.0, 0.5])
def test_shapes_and_counts(frontend, layout, seconds):
    tok = AudioTokenizer(DIM, frontend=frontend, **layout)
    S = int(seconds * SR)
    out = tok(noise(2, S))
    L = frames_in(S)  # 98 frames for 1 s, 48 for 0.5 s
    pt, pf = (16, 16) if layout["layout"] == "patches" else (4, 128)
    n, f = math.ceil(L / pt), 128 // pf
    assert (n, f) == tok.grid(S)
    assert out.embeddings.shape == (2, n * f, DIM)
    assert out.axes == ("time", "freq") and out.positions.shape == (2, n * f, 2)
    assert out.padding_mask is None  # no lengths given: nothing is padding
    tok.eval()  # no SpecAugment: the same input gives the same tokens
    wave = noise(2, S)
    full = tok(wave, torch.tensor([S, S]))  # lengths that pad nothing: no mask either
    assert full.padding_mask is None and torch.equal(full.embeddings, tok(wave).embeddings)
    assert out.modality_ids.unique().tolist() == [0]
    k, j = out.positions[0].long().unbind(-1)
    assert torch.equal(k * f + j, torch.arange(n * f))  # (time, freq) row-major
    # regions: exact sample support in seconds, mel-bin spans
    torch.testing.assert_close(out.regions[0, :, 0, 0], k * pt * HOP / SR)
    torch.testing.assert_close(out.regions[0, :, 0, 1], (k * pt * HOP + (pt - 1) * HOP + WIN) / SR)
    assert torch.equal(out.regions[0, :, 1, 0], j.float() * pf)
    assert torch.equal(out.regions[0, :, 1, 1], (j.float() + 1) * pf)
    # default segment: one token time step
    assert torch.equal(out.segment_ids[0], k)
    assert (out.num_segments, out.max_segment_len) == (n, f)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["patches", "frames"])
def test_padding_exactly_past_each_clip_end(layout):
    tok = AudioTokenizer(DIM, **layout)
    lengths = torch.tensor([16000, 8000, 5000, 560, 400])
    out = tok(noise(5, 16000), lengths)
    # Independent statement of the rule: a token is real iff its first frame fits in the clip.
    first_frame_end = out.regions[..., 0, 0] * SR + WIN  # (B, N) samples
    expected = first_frame_end > lengths[:, None] + 0.5
    assert torch.equal(out.padding_mask, expected)
    pt = 16 if layout["layout"] == "patches" else 4
    f = out.embeddings.shape[1] // tok.grid(16000)[0]
    real_steps = [math.ceil(frames_in(int(n)) / pt) for n in lengths]
    assert out.lengths().tolist() == [s * f for s in real_steps]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["patches", "frames"])
@pytest.mark.parametrize("learned", [False, True])
def test_same_clip_two_lengths_identical_prefix(frontend, layout, learned):
    torch.manual_seed(0)
    # table longer than both grids: both crop it (PaSST), so the prefix keeps its embeddings
    grid = (30, 8 if layout["layout"] == "patches" else 1) if learned else None
    tok = AudioTokenizer(DIM, frontend=frontend, learned_pos_grid=grid, **layout).eval()
    x = noise(16000, seed=1)
    short = 9000  # 54 frames: patches 3 full tokens + 1 straddling, frames 13 full + 1
    batch = torch.stack((x, torch.cat((x[:short], torch.zeros(16000 - short)))))
    out = tok(batch, torch.tensor([16000, short]))
    pt = 16 if layout["layout"] == "patches" else 4
    f = 128 // (16 if layout["layout"] == "patches" else 128)
    full = (frames_in(short) // pt) * f  # tokens whose frames all lie inside the short clip
    torch.testing.assert_close(
        out.embeddings[1, :full], out.embeddings[0, :full], atol=1e-5, rtol=0
    )
    # Tokens past the short clip's end are really affected by the cut (the test can fail).
    assert not torch.allclose(out.embeddings[1, full:], out.embeddings[0, full:], atol=1e-3)

    # The short clip alone, and with garbage instead of zeros past its end, gives the same real
    # tokens (straddling one included): nothing outside a clip leaks in.
    alone = tok(x[None, :short], torch.tensor([short]))
    real = alone.lengths().item()
    assert real == (full // f + 1) * f
    dirty = batch.clone()
    dirty[1, short:] = noise(16000 - short, seed=7, scale=5.0)
    for other in (out, tok(dirty, torch.tensor([16000, short]))):
        torch.testing.assert_close(
            other.embeddings[1, :real], alone.embeddings[0], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_marked_time_span_maps_to_token_regions(frontend):
    tok = AudioTokenizer(DIM, frontend=frontend).eval()
    x = noise(1, 32000, scale=0.01)
    a, b = 10 * HOP + 80, 21 * HOP + 80  # burst on samples [1680, 3440), mid-hop boundaries
    marked = x.clone()
    marked[0, a:b] += 0.5 * torch.sin(torch.arange(b - a) * 2 * math.pi * 1000 / SR)
    base, hit = tok(x), tok(marked)
    changed = (hit.embeddings - base.embeddings).abs().amax(-1)[0] > 1e-4
    start, end = hit.regions[0, :, 0, 0], hit.regions[0, :, 0, 1]  # seconds
    overlaps = (start < b / SR) & (end > a / SR)
    assert torch.equal(changed, overlaps)
    # frames 6..21 touch the burst -> token time steps 0 and 1, every frequency patch
    assert hit.positions[0, changed, 0].unique().tolist() == [0.0, 1.0]


def test_marked_time_frequency_block_reconstructed_from_positions():
    torch.manual_seed(0)
    tok = AudioTokenizer(DIM).eval()
    frames = torch.randn(1, 98, 128)
    marked = frames.clone()
    marked[0, 20:35, 40:50] += 3.0  # frames 20..34, mel bins 40..49
    a, b = tok.embed_features(frames, None), tok.embed_features(marked, None)
    changed = (a - b).abs().amax(-1)[0] > 1e-5
    pos = tok(noise(1, 16000)).positions[0]  # same grid: 98 frames
    recon = torch.zeros(7 * 16, 128, dtype=torch.bool)
    for k, j in pos[changed].long().tolist():
        recon[k * 16:(k + 1) * 16, j * 16:(j + 1) * 16] = True
    expected = torch.zeros(7 * 16, 128, dtype=torch.bool)
    expected[16:48, 32:64] = True  # snapped to 16 x 16 patches
    assert torch.equal(recon, expected)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["patches", "frames"])
def test_time_window_segments(layout):
    tok = AudioTokenizer(DIM, segment_seconds=0.5, **layout)
    out = tok(noise(2, 40000), torch.tensor([40000, 12000]))
    seg, start = out.segment_ids[0], out.regions[0, :, 0, 0]
    assert torch.equal(seg, torch.floor(start / 0.5 + 1e-6).long())
    counts = torch.bincount(seg)
    assert len(counts) == out.num_segments == 5  # 2.5 s, the last window partly filled
    assert counts.max() == out.max_segment_len
    assert torch.equal(out.segment_ids[1], seg)  # windows are positional, padding included


@pytest.mark.parametrize("segment_seconds,samples,expected", [
    (None, 40000, True),  # one time step per segment
    (0.64, 40000, True),  # 4 patch columns per window, 4 windows
    (0.64, 42000, False),  # the last window is shorter
    (0.5, 40000, False),  # windows of 3 and 4 patch columns
])
def test_contiguous_segments_flag_matches_the_ids(segment_seconds, samples, expected):
    out = AudioTokenizer(DIM, segment_seconds=segment_seconds)(noise(2, samples))
    N, L = out.embeddings.shape[1], out.max_segment_len
    blocks = out.num_segments * L == N and torch.equal(out.segment_ids[0], torch.arange(N) // L)
    assert out.contiguous_segments == blocks == expected


def test_specaugment_only_in_training():
    torch.manual_seed(0)
    x, lengths = noise(2, 16000), torch.tensor([16000, 12000])
    tok = AudioTokenizer(DIM, freq_mask=24, time_mask=20)
    tok.eval()
    ref = tok(x, lengths).embeddings
    assert torch.equal(tok(x, lengths).embeddings, ref)
    tok.train()
    assert not torch.allclose(tok(x, lengths).embeddings, ref)
    off = AudioTokenizer(DIM, freq_mask=0, time_mask=0)
    off.load_state_dict(tok.state_dict())
    assert torch.equal(off.train()(x, lengths).embeddings, off.eval()(x, lengths).embeddings)


def test_default_filterbank_has_no_empty_filters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AudioTokenizer(DIM)


def test_sample_rate_checked():
    tok = AudioTokenizer(DIM)
    x = noise(2, 8000)
    tok(x, sample_rate=16000)
    tok(x, sample_rate=torch.tensor([16000, 16000]))
    with pytest.raises(ValueError, match=r"expects 16000 Hz, batch has \[8000\]"):
        tok(x, sample_rate=8000)
    with pytest.raises(ValueError, match=r"expects 16000 Hz, batch has \[8000, 16000\]"):
        tok(x, sample_rate=torch.tensor([16000, 8000]))


@pytest.mark.parametrize(
    "shape,lengths,match",
    [
        ((2, 1, 8000), None, r"\(B, S\) waveforms, got shape \(2, 1, 8000\)"),
        ((2, 300), None, r"S=300 samples, fewer than one 400-sample window"),
        ((2, 8000), [8000, 0], r"clips \[1\] have \[0\]: empty clip"),
        ((2, 8000), [399, 8000], r"clips \[0\] have \[399\]"),
        ((2, 8000), [8001, 8000], r"in \[400, S=8000\]"),
        ((2, 8000), [8000], r"audio_lengths must be \(B=2,\), got shape \(1,\)"),
    ],
)
def test_bad_input_names_shapes(shape, lengths, match):
    lengths = None if lengths is None else torch.tensor(lengths)
    with pytest.raises(ValueError, match=match):
        AudioTokenizer(DIM)(torch.zeros(shape), lengths)


def test_bad_config():
    with pytest.raises(ValueError, match="divide n_mels=128"):
        AudioTokenizer(DIM, patch_size=(16, 12))
    with pytest.raises(ValueError, match="layout must be one of"):
        AudioTokenizer(DIM, layout="columns")
    with pytest.raises(ValueError, match="frontend must be one of"):
        AudioTokenizer(DIM, frontend="mfcc")


@pytest.mark.parametrize("rate", [11025, 22050, 44100])
@pytest.mark.parametrize("frontend", ["kaldi", "mel"])
def test_frame_grid_matches_the_frontend_at_odd_rates(rate, frontend):
    """Window and hop in samples are truncated as Kaldi truncates them, so the token grid the
    tokenizer promises is the one the front end computes (11025 Hz: 275-sample windows)."""
    tok = AudioTokenizer(DIM, sample_rate=rate, frontend=frontend).eval()
    S = int(rate * 0.731)
    assert tok.features(torch.randn(1, S) * 0.1).shape[1] == tok.num_frames(S)
