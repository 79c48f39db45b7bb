"""Probe media files before they go into shards: is the file readable, what does it hold.

Probing happens once, when shards are written, so that the DataModule never meets a file that was
known to be broken, and so that each sample's JSON record carries the facts the decoder needs
(frame count for clip sampling, sample rate, duration).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import soundfile as sf

# soundfile (libsndfile) reads these natively and faster than FFmpeg; everything else goes to PyAV.
SOUNDFILE_EXTS = frozenset({"wav", "flac", "ogg"})
AUDIO_EXTS = frozenset({"wav", "flac", "ogg", "mp3", "m4a"})
VIDEO_EXTS = frozenset({"mp4", "mkv", "webm", "avi"})
MEDIA_EXTS = AUDIO_EXTS | VIDEO_EXTS


class ProbeError(Exception):
    """A file that cannot go into a shard; the message is the reason shown in the report."""


@dataclass(frozen=True)
class MediaInfo:
    """What one media file holds. Video fields are None for audio files, and the audio fields are
    None for a video without an audio stream."""

    ext: str
    duration: float
    sample_rate: int | None = None
    channels: int | None = None
    fps: float | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None

    @property
    def has_audio(self) -> bool:
        return self.sample_rate is not None

    @property
    def has_video(self) -> bool:
        return self.frames is not None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def media_ext(path: str | Path) -> str:
    return Path(path).suffix.lower().lstrip(".")


def probe_bytes(data: bytes, ext: str) -> MediaInfo:
    """Probe encoded bytes; raises ProbeError with a human-readable reason."""
    if not data:
        raise ProbeError("empty file (0 bytes)")
    if ext not in MEDIA_EXTS:
        raise ProbeError(f"unsupported extension '.{ext}' (supported: {', '.join(sorted(MEDIA_EXTS))})")
    try:
        info = _probe_soundfile(data, ext) if ext in SOUNDFILE_EXTS else _probe_pyav(data, ext)
    except ProbeError:
        raise
    except Exception as exn:  # every decoder failure mode (sf.LibsndfileError, av.FFmpegError, ...)
        raise ProbeError(f"unreadable: {type(exn).__name__}: {exn}") from exn
    if info.duration <= 0 or (info.has_video and info.frames == 0):
        raise ProbeError("empty media (zero duration or no frames)")
    return info


def probe_file(path: str | Path) -> MediaInfo:
    path = Path(path)
    if not path.is_file():
        raise ProbeError("file not found")
    return probe_bytes(path.read_bytes(), media_ext(path))


def _probe_soundfile(data: bytes, ext: str) -> MediaInfo:
    with sf.SoundFile(io.BytesIO(data)) as f:
        if f.frames == 0:
            raise ProbeError("empty audio (0 frames)")
        # The header can be intact while the payload is garbage: decode a first block to be sure.
        f.read(min(f.frames, 4096), dtype="float32")
        return MediaInfo(ext=ext, duration=f.frames / f.samplerate, sample_rate=f.samplerate, channels=f.channels)


def _probe_pyav(data: bytes, ext: str) -> MediaInfo:
    with av.open(io.BytesIO(data)) as container:
        audio = container.streams.audio[0] if container.streams.audio else None
        # An audio file is probed for its audio only: a video stream there is cover art.
        video = video_stream(container) if ext in VIDEO_EXTS else None
        if ext in VIDEO_EXTS and video is None:
            raise ProbeError("no video stream")
        if ext in AUDIO_EXTS and audio is None:
            raise ProbeError("no audio stream")
        stream = video if video is not None else audio
        duration = _duration(container, stream)
        # Decoding one frame catches files whose headers parse but whose codec data is broken.
        if next(container.decode(stream), None) is None:
            raise ProbeError("no decodable frame")
        fields = dict(ext=ext, duration=duration)
        if audio is not None:
            fields.update(sample_rate=audio.codec_context.sample_rate, channels=audio.codec_context.channels)
        if video is not None:
            fps = float(video.average_rate or video.guessed_rate or 0)
            # mkv/webm often leave the frame count at 0; the duration x fps estimate is what clip
            # sampling needs (the decoder clamps to the frames that really exist).
            frames = video.frames or round(duration * fps)
            fields.update(fps=fps, frames=frames, width=video.codec_context.width, height=video.codec_context.height)
        return MediaInfo(**fields)


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The first video stream that is moving pictures, not an attached picture (cover art)."""
    pictures = (s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic)
    return next(pictures, None)


def _duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0
