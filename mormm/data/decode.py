"""Raw shard samples -> tensors -> batches.

Dimensions:
    B  clips in a batch          V  views per clip (1 in training; eval_views for evaluation)
    S  audio samples (padded)    T  video frames    C  colour channels (3)    H, W  frame pixels

A shard sample is webdataset's dict {"__key__", "json", "cls", <ext>: encoded bytes}. Decoding
runs in DataLoader workers: PyAV for video and compressed audio, soundfile for wav/flac/ogg (it is
faster and needs no FFmpeg). Views are placed by a relative position p in [0, 1] (0 = the clip's
start, 1 = its end), applied to audio and video alike, so an audio+video view covers the same
moment in both modalities.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mormm.data.probe import AUDIO_EXTS, SOUNDFILE_EXTS, VIDEO_EXTS, video_stream

MODALITIES = ("audio", "video")


@dataclass(frozen=True)
class DecodeConfig:
    modalities: tuple[str, ...]
    sample_rate: int = 16_000
    clip_seconds: float | None = None  # audio crop length; None keeps whole clips (padded in batches)
    num_frames: int = 8
    frame_stride: int = 1  # take every frame_stride-th frame
    frame_size: int = 32  # frames are resized (short side) and cropped to frame_size x frame_size
    eval_views: int = 1  # evaluation views per clip, evenly spread from start to end

    def __post_init__(self):
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            raise ValueError(f"modalities {self.modalities!r}: choose one or both of {MODALITIES}")
        if self.clip_seconds is not None and self.clip_seconds <= 0:
            raise ValueError(f"clip_seconds={self.clip_seconds}: must be positive, or None for whole clips")
        for name in ("sample_rate", "num_frames", "frame_stride", "frame_size", "eval_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")


@dataclass
class DecodedSample:
    key: str
    meta: dict
    label: torch.Tensor  # () long, or (num_classes,) float multi-hot
    audio: torch.Tensor | None  # (V, S) float32
    video: torch.Tensor | None  # (V, T, C, H, W) float32 in [0, 1]


# ---------------------------------------------------------------------------------------------
# audio


def decode_audio(data: bytes, ext: str, sample_rate: int) -> torch.Tensor:
    """Encoded audio (or a video's audio track) -> mono float32 (S,) at sample_rate."""
    if ext in SOUNDFILE_EXTS:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (S, channels)
        wave = torch.from_numpy(wave).mean(dim=1)
    else:
        wave, rate = _decode_audio_pyav(data)
    if wave.numel() == 0:
        raise ValueError("audio stream has no samples")
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    return wave


def _decode_audio_pyav(data: bytes) -> tuple[torch.Tensor, int]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        # Packed float mono at the source rate: downmixing here is exact; the rate change is left
        # to torchaudio so every format goes through the same resampler.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        for frame in container.decode(stream):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), rate


def crop_audio(wave: torch.Tensor, length: int | None, positions: list[float]) -> torch.Tensor:
    """(S,) -> (V, L): one window of `length` samples per position; shorter clips are kept whole."""
    if length is None or wave.shape[0] <= length:
        return wave.expand(len(positions), -1)
    slack = wave.shape[0] - length
    return torch.stack([wave[round(p * slack) : round(p * slack) + length] for p in positions])


# ---------------------------------------------------------------------------------------------
# video


def frame_indices(total: int, num_frames: int, stride: int, position: float) -> list[int]:
    """Frame numbers of one clip: num_frames, stride apart, placed at `position`; a video shorter
    than the span repeats its last frame (clamped), so every clip has exactly num_frames."""
    span = (num_frames - 1) * stride + 1
    start = round(position * max(0, total - span))
    return [min(start + i * stride, total - 1) for i in range(num_frames)]


def decode_frames(data: bytes, indices: list[int]) -> torch.Tensor:
    """Decode the frames at `indices` (any order, repeats allowed) -> uint8 (N, C, H, W).

    Decodes sequentially and stops after the last wanted frame: short clips make seeking not worth
    its keyframe bookkeeping. If the file holds fewer frames than its header said, wanted frames
    past the end become its last frame."""
    wanted, last_wanted = set(indices), max(indices)
    got: dict[int, np.ndarray] = {}
    last = None
    with av.open(io.BytesIO(data)) as container:
        stream = video_stream(container)
        if stream is None:
            raise ValueError("no video stream")
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            last = frame.to_ndarray(format="rgb24")  # (H, W, C)
            if i in wanted:
                got[i] = last
            if i >= last_wanted:
                break
    if last is None:
        raise ValueError("video stream has no decodable frames")
    frames = np.stack([got.get(i, last) for i in indices])  # (N, H, W, C)
    return torch.from_numpy(frames).permute(0, 3, 1, 2)  # (N, C, H, W)


# ---------------------------------------------------------------------------------------------
# samples and batches


class DecodeError(Exception):
    """A sample that failed to decode; the message names the sample, its shard and the cause."""


UNLABELLED = -1  # single-label target of a sample without a label (prediction input)


class SampleDecoder:
    """Callable for the data pipeline: raw shard sample -> DecodedSample. Raises DecodeError on bad
    data; the pipeline's handler counts and skips the sample.

    Training draws its clip position and crop from the `rng` given with each sample (the training
    stream seeds one per sample, so augmentation is reproducible and a resumed epoch needs no
    generator state); without one, from an unseeded generator.

    allow_unlabelled (prediction only): a sample without "cls" gets the label UNLABELLED (-1), or
    all zeros for multi-label, instead of being an error."""

    def __init__(
        self, config: DecodeConfig, num_classes: int, multi_label: bool, train: bool, allow_unlabelled: bool = False
    ):
        self.config = config
        self.num_classes = num_classes
        self.multi_label = multi_label
        self.train = train
        self.allow_unlabelled = allow_unlabelled
        # Resize keeps the aspect ratio (short side -> frame_size); the crop then picks the square.
        self.resize = v2.Resize(config.frame_size, antialias=True)

    def positions(self, rng: random.Random) -> list[float]:
        if self.train:
            return [rng.random()]
        views = self.config.eval_views
        return [0.5] if views == 1 else [v / (views - 1) for v in range(views)]

    def crop(self, view: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """(T, C, H, W) uint8 -> (T, C, size, size) float in [0, 1]: a random square in training (the
        same place in every frame of the clip), the centre in evaluation."""
        size = self.config.frame_size
        view = self.resize(view)
        if self.train:
            # torchvision's RandomCrop draws from torch's global generator; the position comes
            # from the per-sample rng instead, so a resumed epoch crops the same squares.
            top, left = rng.randint(0, view.shape[-2] - size), rng.randint(0, view.shape[-1] - size)
            view = TF.crop(view, top, left, size, size)
        else:
            view = TF.center_crop(view, [size, size])
        return TF.to_dtype(view, torch.float32, scale=True)

    def __call__(self, sample: dict, rng: random.Random | None = None) -> DecodedSample:
        try:
            return self._decode(sample, rng or random.Random())
        except Exception as exn:
            where = f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}"
            raise DecodeError(f"{where}: {type(exn).__name__}: {exn}") from exn

    def _decode(self, sample: dict, rng: random.Random) -> DecodedSample:
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        positions = self.positions(rng)
        audio_ext = next((e for e in sample if e in AUDIO_EXTS), None)
        video_ext = next((e for e in sample if e in VIDEO_EXTS), None)
        audio = video = None
        if "audio" in self.config.modalities:
            source = audio_ext or video_ext  # a video's own audio track when no separate audio file
            if source is None:
                raise ValueError(f"sample {key} has no audio (members: {_members(sample)})")
            wave = decode_audio(sample[source], source, self.config.sample_rate)
            seconds = self.config.clip_seconds
            length = None if seconds is None else round(seconds * self.config.sample_rate)
            audio = crop_audio(wave, length, positions)  # (V, S)
        if "video" in self.config.modalities:
            if video_ext is None:
                raise ValueError(f"sample {key} has no video (members: {_members(sample)})")
            total = meta["media"][video_ext]["frames"]  # probed when the shard was written
            c = self.config
            per_view = [frame_indices(total, c.num_frames, c.frame_stride, p) for p in positions]
            frames = decode_frames(sample[video_ext], [i for view in per_view for i in view])  # (V*T, C, H, W)
            views = frames.reshape(len(positions), c.num_frames, *frames.shape[1:])
            video = torch.stack([self.crop(v, rng) for v in views])  # (V, T, C, H, W)
        return DecodedSample(key=key, meta=meta, label=self._label(sample.get("cls")), audio=audio, video=video)

    def _label(self, cls: bytes | None) -> torch.Tensor:
        if cls is None:
            if not self.allow_unlabelled:
                raise ValueError("sample has no label (.cls)")
            if self.multi_label:
                return torch.zeros(self.num_classes)
            return torch.tensor(UNLABELLED, dtype=torch.long)
        indices = [int(v) for v in cls.decode().split(",")]
        # Checked here, where the sample is skipped and counted: past this point an index out of
        # range fails the loss on the device (or, negative, names another class multi-hot).
        bad = [i for i in indices if not 0 <= i < self.num_classes]
        if bad:
            raise ValueError(f"label {bad[0]} is not a class of this dataset (its index.json "
                             f"lists {self.num_classes}: 0..{self.num_classes - 1}); were these "
                             "shards written with another index?")
        if not self.multi_label:
            return torch.tensor(indices[0], dtype=torch.long)
        target = torch.zeros(self.num_classes)
        target[indices] = 1.0
        return target


def _members(sample: dict) -> str:
    return ", ".join(k for k in sample if not k.startswith("__"))


def collate(samples: list[DecodedSample], sample_rate: int) -> dict:
    """List of DecodedSample -> the batch dict the tokenizers consume.

    audio (B*V, S) zero-padded + audio_lengths (B*V,); video (B*V, T, C, H, W); label (B,) or
    (B, num_classes); key / meta: one per clip. With several views, clip_index (B*V,) says which
    clip each row belongs to, so the model can average logits per clip."""
    views = next(s.audio if s.audio is not None else s.video for s in samples).shape[0]
    batch: dict = {
        "label": torch.stack([s.label for s in samples]),
        "key": [s.key for s in samples],
        "meta": [s.meta for s in samples],
    }
    if samples[0].audio is not None:
        rows = [row for s in samples for row in s.audio]
        lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
        audio = torch.zeros(len(rows), int(lengths.max()))
        for i, r in enumerate(rows):
            audio[i, : r.shape[0]] = r
        batch.update(audio=audio, audio_lengths=lengths, sample_rate=sample_rate)
    if samples[0].video is not None:
        batch["video"] = torch.cat([s.video for s in samples])  # (B*V, T, C, H, W)
    if views > 1:
        batch["clip_index"] = torch.arange(len(samples)).repeat_interleave(views)
    return batch
