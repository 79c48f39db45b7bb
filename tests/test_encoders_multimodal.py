import pytest
import torch

from encoders import AudioTokenizer, AudioVideoTokenizer, VideoTokenizer

DIM, SR = 16, 16000


def make(segment_seconds=None, time_unit=None, fps=12.5):
    torch.manual_seed(0)
    audio = AudioTokenizer(DIM)  # 0.16 s per token time step
    video = VideoTokenizer(DIM, patch_size=8, tubelet_size=2, frame_rate=fps)  # 0.16 s per slice
    return AudioVideoTokenizer(audio, video, segment_seconds, time_unit).eval()


def batch(seconds=1.92, fps=12.5, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, T = int(seconds * SR), int(seconds * fps)
    return 0.01 * torch.randn(B, S, generator=g), torch.rand(B, T, 3, 16, 16, generator=g)


def test_one_sequence_from_both_tokenizers():
    tok = make()
    audio, video = batch()
    lengths = torch.tensor([30720, 12000])
    out = tok(audio, video, audio_lengths=lengths, sample_rate=SR)
    a, v = tok.audio(audio, lengths), tok.video(video)
    Na, Nv = a.embeddings.shape[1], v.embeddings.shape[1]
    assert out.embeddings.shape == (2, Na + Nv, DIM)
    assert out.axes == ("time", "freq|height", "width") and out.positions.shape[-1] == 3
    # learned modality embeddings on top of the sub-tokenizers' embeddings
    torch.testing.assert_close(out.embeddings[:, :Na], a.embeddings + tok.modality_embed[0])
    torch.testing.assert_close(out.embeddings[:, Na:], v.embeddings + tok.modality_embed[1])
    assert out.modality_ids[:, :Na].unique().tolist() == [0]
    assert out.modality_ids[:, Na:].unique().tolist() == [1]
    assert not out.contiguous_segments  # a window's audio tokens and video tokens lie apart
    # padding: the audio mask, video never padded
    assert torch.equal(out.padding_mask[:, :Na], a.padding_mask)
    assert not out.padding_mask[:, Na:].any()
    assert tok(audio, video).padding_mask is None
    # spatial axes: audio (freq patch, 0), video (row, column)
    audio_spatial = torch.nn.functional.pad(a.positions[..., 1:], (0, 1))  # (freq, 0)
    assert torch.equal(out.positions[:, :Na, 1:], audio_spatial)
    assert torch.equal(out.positions[:, Na:, 1:], v.positions[..., 1:])
    assert set(tok.input_keys) == {"audio", "audio_lengths", "sample_rate", "video"}


@pytest.mark.parametrize("segment_seconds,time_unit,fps", [(None, None, 12.5), (0.5, 0.1, 25.0)])
def test_shared_time_axis_and_windows(segment_seconds, time_unit, fps):
    tok = make(segment_seconds, time_unit, fps)
    audio, video = batch(fps=fps)
    out = tok(audio, video)
    start = out.regions[0, :, 0, 0]  # seconds, both modalities
    # time position = start time in time_unit steps, for audio and video alike
    torch.testing.assert_close(out.positions[0, :, 0] * tok.time_unit, start)
    # one window per segment_seconds, shared by audio and video tokens
    seg = out.segment_ids[0]
    assert torch.equal(seg, torch.floor(start / tok.segment_seconds + 1e-6).long())
    counts = torch.bincount(seg)
    assert len(counts) == out.num_segments and counts.max() == out.max_segment_len
    for s in range(out.num_segments):  # every window holds both modalities
        assert out.modality_ids[0, seg == s].unique().tolist() == [0, 1]


def test_default_unit_keeps_audio_positions_integer():
    tok = make(fps=25.0)  # video slices every 0.08 s = half an audio step
    audio, video = batch(fps=25.0)
    out = tok(audio, video)
    a = out.modality_ids[0] == 0
    t = out.positions[0, :, 0]
    assert torch.equal(t[a], t[a].round())
    assert torch.equal(torch.unique(t[~a]), torch.arange(24) * 0.5)


def test_marked_time_in_both_modalities_lands_in_same_segment():
    fps = 12.5
    tok = make(segment_seconds=0.48, fps=fps)
    audio, video = batch(fps=fps, B=1)
    # The same instant marked in both streams: an audio burst over 1.005-1.105 s (mid-hop
    # boundaries) and a flash on frame 13 (1.04-1.12 s).
    marked_a, marked_v = audio.clone(), video.clone()
    marked_a[0, 16080:17680] += 0.5
    marked_v[0, 13] = 1.0 - marked_v[0, 13]
    base, hit = tok(audio, video), tok(marked_a, marked_v)
    changed = (hit.embeddings - base.embeddings).abs().amax(-1)[0] > 1e-4
    is_audio = hit.modality_ids[0] == 0
    t = hit.positions[0, :, 0]
    # audio token 6 spans 0.96-1.135 s, video slice 6 spans 0.96-1.12 s: same time position...
    assert t[changed & is_audio].unique().tolist() == [6.0]
    assert t[changed & ~is_audio].unique().tolist() == [6.0]
    # ...and the same routing window, floor(0.96 / 0.48) = 2
    assert hit.segment_ids[0, changed].unique().tolist() == [2]
    assert is_audio[changed].any() and (~is_audio[changed]).any()


def test_bad_inputs():
    tok = make()
    audio, video = batch()
    with pytest.raises(ValueError, match=r"batch sizes differ: audio \(2, 30720\), video \(1, "):
        tok(audio, video[:1])
    with pytest.raises(ValueError, match="multiple of tubelet_size=2, got T=23"):
        tok(audio, video[:, :23])
    with pytest.raises(ValueError, match=r"audio covers 1.920 s .* video covers 0.960 s .*frame_rate=12.5"):
        tok(audio, video[:, :12])  # half the clip, or a frame_rate that does not match the data
    with pytest.raises(ValueError, match="audio dim 16 != video dim 8"):
        AudioVideoTokenizer(AudioTokenizer(16), VideoTokenizer(8))


def test_built_from_yaml_with_components():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=AudioVideoTokenizer)
    cfg = parser.parse_string(
        """
tokenizer:
  class_path: encoders.AudioVideoTokenizer
  init_args:
    segment_seconds: 0.5
    audio:
      class_path: encoders.AudioTokenizer
      init_args: {dim: 8, layout: frames, frames_per_token: 4, patch_size: [16, 16]}
    video:
      class_path: encoders.VideoTokenizer
      init_args: {dim: 8, patch_size: 8, frame_rate: 12.5}
"""
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    tok = instantiate(cfg).tokenizer
    assert isinstance(tok.audio, AudioTokenizer) and tok.audio.pt == 4
    assert tok.segment_seconds == 0.5 and tok.video.frame_rate == 12.5
    audio, video = batch(seconds=1.0)
    assert tok(audio, video).embeddings.shape == (2, 25 + 6 * 4, 8)
