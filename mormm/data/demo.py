"""Built-in demo datasets: small synthetic clips whose class is decided by a localised event.

Each clip is mostly background (audio: a noise floor, silence and class-neutral noise bursts;
video: a static smooth texture). Somewhere in time (and, for video, in space) one event happens,
and the event alone decides the class, so a model must find it, and per-token depth has
something to show. The event annotation goes into each sample's JSON record ("event": start/end
seconds; video adds the event frames and a per-frame object box in pixels) for depth analysis.

Classes (shared by audio and video so the audio+video demo has one event seen by both):
    rise    audio: up-chirp          video: filled square moving up
    fall    audio: down-chirp        video: hollow square moving down
    pulse   audio: three tone beeps  video: blinking cross
    wobble  audio: vibrato tone      video: horizontal bar zig-zagging

Generation goes through the user path on purpose: write .wav/.mp4 files and a JSONL manifest,
then `write_shards` on them. Shards land in <cache>/demo/<kind>-seed<seed>-v<version>; the raw
files are temporary. Deterministic by seed; a few seconds on a laptop CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from mormm.data.shards import write_shards

DEMO_KINDS = ("audio", "video", "audio_video")
DEMO_VERSION = 1  # bump when the generated data changes, so stale caches are not reused
CLASSES = ("rise", "fall", "pulse", "wobble")

SAMPLE_RATE = 16_000
DURATION_S = 1.0
FPS = 16
FRAME_SIZE = 32  # pixels, square
OBJECT_SIZE = 8  # pixels


@dataclass(frozen=True)
class Event:
    label: int
    start_s: float
    end_s: float


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The demo cache: cache_dir, else $MORMM_CACHE, else ~/.cache/mormm (demos go in <root>/demo)."""
    root = cache_dir or os.environ.get("MORMM_CACHE") or "~/.cache/mormm"
    return Path(root).expanduser() / "demo"


def ensure_demo(
    kind: str = "audio", cache_dir: str | Path | None = None, seed: int = 0, samples_per_class: int = 250
) -> Path:
    """Return the folder of the demo shards (with index.json), generating them on first use."""
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo {kind!r}; choose one of {', '.join(DEMO_KINDS)}")
    root = cache_root(cache_dir)
    target = root / f"{kind}-n{samples_per_class}-seed{seed}-v{DEMO_VERSION}"
    if (target / "index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build in a private folder and rename into place: DDP ranks may all get here at once, and
    # a rename is atomic, so each either wins or finds the finished copy of another rank.
    with tempfile.TemporaryDirectory(dir=root, prefix=f".tmp-{kind}-") as tmp:
        shards = Path(tmp) / "shards"
        manifest = _write_media(Path(tmp) / "raw", kind, seed, samples_per_class)
        columns = {"audio": ["audio"], "video": ["video"], "audio_video": ["audio", "video"]}[kind]
        # 100 samples per shard: enough shards for 2 ranks x 2 workers to stream disjoint ones.
        write_shards(manifest, shards, path_columns=columns, split=[0.8, 0.1, 0.1], seed=seed, max_samples=100)
        try:
            shards.rename(target)
        except OSError:
            if not (target / "index.json").is_file():
                raise
    return target


def _write_media(folder: Path, kind: str, seed: int, samples_per_class: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(samples_per_class * len(CLASSES)):
        event = _sample_event(rng, label=n % len(CLASSES))
        row: dict = {"label": CLASSES[event.label], "event": {"start_s": event.start_s, "end_s": event.end_s}}
        if kind in ("audio", "audio_video"):
            path = folder / f"{n:05d}.wav"
            sf.write(path, _audio_clip(rng, event), SAMPLE_RATE, subtype="PCM_16")
            row["audio"] = path.name
        if kind in ("video", "audio_video"):
            path = folder / f"{n:05d}.mp4"
            frames, boxes = _video_clip(rng, event)
            write_mp4(path, frames)
            row["video"] = path.name
            row["event"].update(frames=[i for i, b in enumerate(boxes) if b is not None], boxes=boxes)
        rows.append(row)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _sample_event(rng: np.random.Generator, label: int) -> Event:
    duration = rng.uniform(0.3, 0.45)
    start = rng.uniform(0.05, DURATION_S - duration - 0.05)
    # Snap to frame boundaries so the audio event and the video event cover the same time.
    start, end = np.round(start * FPS) / FPS, np.round((start + duration) * FPS) / FPS
    return Event(label=label, start_s=float(start), end_s=float(end))


# ---------------------------------------------------------------------------------------------
# audio


def _audio_clip(rng: np.random.Generator, event: Event) -> np.ndarray:
    n = int(DURATION_S * SAMPLE_RATE)
    wave = rng.normal(0, rng.uniform(0.001, 0.005), n)  # noise floor: near silence
    for _ in range(rng.integers(1, 3)):  # class-neutral distractors: broadband bursts
        length = int(rng.uniform(0.05, 0.15) * SAMPLE_RATE)
        at = rng.integers(0, n - length)
        wave[at : at + length] += rng.normal(0, rng.uniform(0.02, 0.06), length)
    a, b = int(event.start_s * SAMPLE_RATE), int(event.end_s * SAMPLE_RATE)
    wave[a:b] += rng.uniform(0.2, 0.4) * _audio_event(rng, event.label, b - a)
    return np.clip(wave, -1, 1).astype(np.float32)


def _audio_event(rng: np.random.Generator, label: int, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(400, 1200)
    name = CLASSES[label]
    if name in ("rise", "fall"):
        f_start, f_end = (f0, 2.5 * f0) if name == "rise" else (2.5 * f0, f0)
        freq = np.linspace(f_start, f_end, n)
    elif name == "pulse":
        freq = np.full(n, 1.5 * f0)
    else:  # wobble: vibrato at 10-14 Hz
        freq = 1.5 * f0 + 0.25 * f0 * np.sin(2 * np.pi * rng.uniform(10, 14) * t)
    tone = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
    if name == "pulse":  # three beeps: on/off in fifths of the event
        tone *= (np.floor(5 * np.arange(n) / n) % 2 == 0).astype(float)
    fade = np.minimum(1, np.minimum(np.arange(n), n - 1 - np.arange(n)) / (0.01 * SAMPLE_RATE))
    return tone * fade


# ---------------------------------------------------------------------------------------------
# video


def _video_clip(rng: np.random.Generator, event: Event) -> tuple[np.ndarray, list[list[int] | None]]:
    """Frames (T, H, W, 3) uint8 and the object's box [x0, y0, x1, y1] (pixels, end-exclusive)
    per frame, None where the object is not visible."""
    t_total = int(DURATION_S * FPS)
    # Smooth static texture: a coarse random grid upsampled; greyish so the object stands out.
    coarse = rng.uniform(0.15, 0.55, (6, 6, 3)) * rng.uniform(0.7, 1.0, 3)
    idx = np.linspace(0, 5, FRAME_SIZE)
    lo, frac = np.floor(idx).astype(int), idx - np.floor(idx)
    hi = np.minimum(lo + 1, 5)
    rows = coarse[lo] * (1 - frac)[:, None, None] + coarse[hi] * frac[:, None, None]
    background = rows[:, lo] * (1 - frac)[None, :, None] + rows[:, hi] * frac[None, :, None]
    colour = np.array([(1, 0.2, 0.2), (0.2, 1, 0.2), (0.3, 0.5, 1), (1, 1, 0.2), (1, 1, 1)])[rng.integers(5)]
    shape = _object_mask(event.label)

    f0, f1 = int(round(event.start_s * FPS)), int(round(event.end_s * FPS))
    steps = f1 - f0
    name = CLASSES[event.label]
    margin = FRAME_SIZE - OBJECT_SIZE
    if name in ("rise", "fall"):  # 2 px per frame vertically
        travel = 2 * (steps - 1)
        x = rng.integers(0, margin + 1)
        y_start = rng.integers(travel, margin + 1) if name == "rise" else rng.integers(0, margin - travel + 1)
        step = -2 if name == "rise" else 2
        path = [(x, y_start + step * i) for i in range(steps)]
    elif name == "pulse":  # static, visible every other pair of frames
        x, y = rng.integers(0, margin + 1, 2)
        path = [(x, y) if (i // 2) % 2 == 0 else None for i in range(steps)]
    else:  # wobble: horizontal zig-zag of +-3 px
        x, y = rng.integers(3, margin - 2), rng.integers(0, margin + 1)
        path = [(x + (3 if i % 2 else -3), y) for i in range(steps)]

    frames = np.repeat(background[None], t_total, axis=0)
    boxes: list[list[int] | None] = [None] * t_total
    for i, pos in enumerate(path):
        if pos is None:
            continue
        x, y = int(pos[0]), int(pos[1])
        region = frames[f0 + i, y : y + OBJECT_SIZE, x : x + OBJECT_SIZE]
        region[shape] = colour
        boxes[f0 + i] = [x, y, x + OBJECT_SIZE, y + OBJECT_SIZE]
    return (frames * 255).round().astype(np.uint8), boxes


def _object_mask(label: int) -> np.ndarray:
    s = OBJECT_SIZE
    mask = np.zeros((s, s), dtype=bool)
    name = CLASSES[label]
    if name == "rise":
        mask[:] = True
    elif name == "fall":
        mask[[0, 1, -2, -1], :] = True
        mask[:, [0, 1, -2, -1]] = True
    elif name == "pulse":
        mask[s // 2 - 1 : s // 2 + 1, :] = True
        mask[:, s // 2 - 1 : s // 2 + 1] = True
    else:
        mask[s // 2 - 2 : s // 2 + 2, :] = True
    return mask


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """uint8 frames (T, H, W, 3) -> an MPEG-4 Part 2 video (in every FFmpeg build, fast to encode)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 1_000_000  # ample for 32x32: keeps the object's edges crisp
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
