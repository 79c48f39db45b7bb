"""Decoding: every supported container, resampling, frame sampling, crops, views and batching."""

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from mormm.data.decode import (
    DecodeConfig,
    DecodeError,
    SampleDecoder,
    collate,
    crop_audio,
    decode_audio,
    decode_frames,
    frame_indices,
)
from mormm.data.probe import ProbeError, probe_bytes


def sine(freq: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.repeat(0.5 * np.sin(2 * np.pi * freq * t)[:, None], channels, axis=1).astype(np.float32)  # (S, ch)


def dominant_freq(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(torch.fft.rfftfreq(wave.shape[0], 1 / rate)[spectrum.argmax()])


def encode_audio(path: Path, wave: np.ndarray, rate: int) -> bytes:
    """(S, ch) float -> wav/flac/ogg with soundfile, mp3/m4a with PyAV."""
    ext = path.suffix[1:]
    if ext in ("wav", "flac", "ogg"):
        sf.write(path, wave, rate, format=ext.upper())
        return path.read_bytes()
    codec, fmt = {"mp3": ("libmp3lame", "mp3"), "m4a": ("aac", "ipod")}[ext]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo" if wave.shape[1] == 2 else "mono")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave.T), format="fltp", layout=stream.layout.name)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path.read_bytes()


def encode_video(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None) -> bytes:
    """uint8 (T, H, W, 3) -> mp4/avi/mkv (MPEG-4 Part 2) or webm (VP8); optional AAC/Opus track."""
    ext = path.suffix[1:]
    vcodec, acodec = ("libvpx", "libopus") if ext == "webm" else ("mpeg4", "aac")
    with av.open(str(path), "w") as container:
        video = container.add_stream(vcodec, rate=fps)
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt, video.bit_rate = "yuv420p", 2_000_000
        if audio is not None:
            stream = container.add_stream(acodec, rate=48_000, layout="mono")
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48_000, 0, Fraction(1, 48_000)
            container.mux(stream.encode(frame))
            container.mux(stream.encode())
        for f in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(video.encode())
    return path.read_bytes()


def numbered_frames(count: int, height: int = 24, width: int = 40) -> np.ndarray:
    """Frame t is a flat grey of level 15 * t: the decoded brightness tells which frame came back."""
    return np.stack([np.full((height, width, 3), 15 * t, dtype=np.uint8) for t in range(count)])


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3", "m4a"])
def test_audio_formats_decode_to_mono_at_the_model_rate(tmp_path: Path, ext: str):
    data = encode_audio(tmp_path / f"a.{ext}", sine(1000, 0.5, 44_100, channels=2), 44_100)
    assert probe_bytes(data, ext).sample_rate == 44_100
    wave = decode_audio(data, ext, 16_000)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    # Lossy codecs add encoder delay and padding (a few thousand samples at most).
    assert abs(wave.shape[0] - 8000) <= (0 if ext in ("wav", "flac") else 1500)
    assert dominant_freq(wave, 16_000) == pytest.approx(1000, abs=5)


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 48_000])
def test_resampling_keeps_duration_and_pitch(tmp_path: Path, rate: int):
    data = encode_audio(tmp_path / "a.wav", sine(440, 1.0, rate), rate)
    wave = decode_audio(data, "wav", 16_000)
    assert wave.shape == (16_000,)
    assert dominant_freq(wave, 16_000) == pytest.approx(440, abs=2)
    assert wave.abs().max() == pytest.approx(0.5, abs=0.02)  # no gain change


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm", "avi"])
def test_video_formats_decode_the_requested_frames(tmp_path: Path, ext: str):
    data = encode_video(tmp_path / f"v.{ext}", numbered_frames(12), fps=12)
    info = probe_bytes(data, ext)
    assert (info.frames, info.fps, info.width, info.height) == (12, 12, 40, 24)
    frames = decode_frames(data, [0, 3, 11, 11, 5, 20])  # any order, repeats, one past the end
    assert frames.shape == (6, 3, 24, 40) and frames.dtype == torch.uint8
    levels = frames.float().mean(dim=(1, 2, 3)) / 15
    assert levels.round().tolist() == [0, 3, 11, 11, 5, 11]  # past the end -> the last frame


def mp3_with_cover_art(path: Path, wave: np.ndarray, rate: int) -> bytes:
    """(S,) float mono -> mp3 with an attached picture (cover art: a one-frame MJPEG video stream)."""
    with av.open(str(path), "w", format="mp3") as container:
        audio = container.add_stream("libmp3lame", rate=rate, layout="mono")
        cover = container.add_stream("mjpeg")
        cover.width, cover.height, cover.pix_fmt = 16, 16, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 128, np.uint8), format="rgb24")
        container.mux(cover.encode(picture.reformat(format="yuvj420p")))
        container.mux(cover.encode())
        frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path.read_bytes()


def test_cover_art_in_an_audio_file_is_not_a_video(tmp_path: Path):
    data = mp3_with_cover_art(tmp_path / "song.mp3", sine(440, 0.5, 16_000)[:, 0], 16_000)
    with av.open(str(tmp_path / "song.mp3")) as container:
        assert len(container.streams.video) == 1  # the picture is there
    info = probe_bytes(data, "mp3")
    assert info.has_audio and not info.has_video
    assert info.sample_rate == 16_000 and info.duration == pytest.approx(0.5, abs=0.06)
    wave = decode_audio(data, "mp3", 16_000)
    assert dominant_freq(wave, 16_000) == pytest.approx(440, abs=5)


def test_frame_indices_place_clips_by_position_and_clamp_short_videos():
    assert frame_indices(16, 4, 2, 0.0) == [0, 2, 4, 6]
    assert frame_indices(16, 4, 2, 1.0) == [9, 11, 13, 15]
    assert frame_indices(16, 4, 2, 0.5) == [4, 6, 8, 10]  # centred: 4 frames before, 5 after
    assert frame_indices(3, 4, 1, 0.5) == [0, 1, 2, 2]


def test_crop_audio_windows_and_short_clips():
    wave = torch.arange(100.0)
    views = crop_audio(wave, 40, [0.0, 0.5, 1.0])
    assert views.shape == (3, 40) and views[:, 0].tolist() == [0, 30, 60]
    assert crop_audio(wave, 200, [0.5]).shape == (1, 100)  # shorter than the window: kept whole
    assert crop_audio(wave, None, [0.5, 0.5]).shape == (2, 100)


def make_sample(tmp_path: Path, key: str, label: str = "1", **files: bytes) -> dict:
    media = {ext: probe_bytes(data, ext).to_json() for ext, data in files.items()}
    record = {"key": key, "label": ["x"], "media": media}
    return {"__key__": key, "__url__": "test.tar", "json": json.dumps(record).encode(), "cls": label.encode(), **files}


def test_sample_decoder_audio_video_shapes_views_and_sync(tmp_path: Path):
    # A 2 s video whose audio track is a 300 Hz tone: audio comes from the mp4 when no separate file.
    mp4 = encode_video(tmp_path / "v.mp4", numbered_frames(16, 48, 64), fps=8, audio=sine(300, 2.0, 48_000))
    sample = make_sample(tmp_path, "k0", mp4=mp4)
    config = DecodeConfig(modalities=("audio", "video"), clip_seconds=0.5, num_frames=4, frame_size=32, eval_views=3)

    out = SampleDecoder(config, num_classes=3, multi_label=False, train=False)(sample)
    assert out.audio.shape == (3, 8000) and out.video.shape == (3, 4, 3, 32, 32)
    assert out.video.dtype == torch.float32 and 0 <= out.video.min() and out.video.max() <= 1
    assert dominant_freq(out.audio[1], 16_000) == pytest.approx(300, abs=4)
    assert out.label.item() == 1 and out.label.dtype == torch.long
    first_frame = (out.video[:, 0].mean(dim=(1, 2, 3)) * 255 / 15).round().tolist()
    assert first_frame == [0, 6, 12]  # views at the start, centre and end of the clip
    assert out.meta["key"] == "k0"

    train = SampleDecoder(config, num_classes=3, multi_label=False, train=True)(sample)
    assert train.audio.shape == (1, 8000) and train.video.shape == (1, 4, 3, 32, 32)

    audio_only = DecodeConfig(modalities=("audio",), clip_seconds=None)
    wav = encode_audio(tmp_path / "a.wav", sine(300, 0.3, 16_000), 16_000)
    out = SampleDecoder(audio_only, 3, False, train=True)(make_sample(tmp_path, "k1", wav=wav, mp4=mp4))
    assert out.audio.shape == (1, 4800) and out.video is None  # the separate audio file wins over the track


def test_sample_decoder_rejects_missing_modality_and_bad_bytes(tmp_path: Path):
    wav = encode_audio(tmp_path / "a.wav", sine(300, 0.3, 16_000), 16_000)
    video = SampleDecoder(DecodeConfig(modalities=("video",)), 3, False, train=False)
    with pytest.raises(DecodeError, match="k in test.tar: ValueError: sample k has no video"):
        video(make_sample(tmp_path, "k", wav=wav))
    sample = make_sample(tmp_path, "k", wav=wav)
    sample["wav"] = b"RIFF" + bytes(50)
    with pytest.raises(DecodeError, match="LibsndfileError"):
        SampleDecoder(DecodeConfig(modalities=("audio",)), 3, False, train=False)(sample)
    with pytest.raises(ProbeError, match="unreadable"):
        probe_bytes(b"RIFF" + bytes(50), "wav")
    # A label the dataset's index does not have: the sample is refused (skipped and counted by
    # the pipeline), not passed on to fail the loss or, negative, to mark another class.
    audio = DecodeConfig(modalities=("audio",))
    for multi_label, label in ((False, "3"), (True, "0,-1"), (False, "-1")):
        with pytest.raises(DecodeError, match=f"label {label.split(',')[-1]} is not a class of "
                                              r"this dataset \(its index.json lists 3: 0..2\)"):
            SampleDecoder(audio, 3, multi_label, train=False)(make_sample(tmp_path, "k", label, wav=wav))


def test_collate_pads_audio_reports_lengths_and_indexes_views(tmp_path: Path):
    config = DecodeConfig(modalities=("audio",), clip_seconds=None, eval_views=2)
    decoder = SampleDecoder(config, num_classes=4, multi_label=True, train=False)
    samples = []
    for i, seconds in enumerate([0.2, 0.5, 0.3]):
        wav = encode_audio(tmp_path / f"{i}.wav", sine(300, seconds, 16_000), 16_000)
        samples.append(decoder(make_sample(tmp_path, f"k{i}", label="0,2", wav=wav)))
    batch = collate(samples, sample_rate=16_000)
    assert batch["audio"].shape == (6, 8000) and batch["audio"].dtype == torch.float32
    assert batch["audio_lengths"].tolist() == [3200, 3200, 8000, 8000, 4800, 4800]
    assert batch["audio"][0, 3200:].abs().sum() == 0  # zero padding past the length
    assert batch["clip_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["label"].tolist() == [[1.0, 0.0, 1.0, 0.0]] * 3  # multi-hot, one row per clip
    assert batch["key"] == ["k0", "k1", "k2"] and batch["sample_rate"] == 16_000
    assert "video" not in batch


def test_decode_config_validates():
    with pytest.raises(ValueError, match="modalities"):
        DecodeConfig(modalities=("text",))
    with pytest.raises(ValueError, match="num_frames"):
        DecodeConfig(modalities=("video",), num_frames=0)
