"""One batch + the classifier's output -> a ClipDepth per clip view (and the maps to draw it).

Dimension legend:
    B  rows of the batch (clip views)     N  tokens     A  region axes
    L  log-mel frames    F  mel bins      T  video frames    C  channels    H, W  pixels

Geometry comes from the tokenizers and Tokens.regions only: the audio map has one cell per
log-mel frame (at its window centre) and mel bin, the video map one cell per frame and pixel, and
owner maps (analysis.maps) link cells to tokens. Annotated events (the demo's meta "event": start
and end seconds; video adds per-frame boxes) are mapped through the same decode geometry as the
inputs: the audio crop offset and the sampled video frames of the view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from encoders.audio import AudioTokenizer
from encoders.video import VideoTokenizer
from mormm.analysis import maps
from mormm.analysis.stats import ClipDepth
from mormm.data.decode import DecodeConfig, frame_indices


@dataclass
class ClipMaps:
    """What the pictures of one clip view need."""

    logmel: np.ndarray | None = None  # (L, F)
    audio_depth: np.ndarray | None = None  # (L, F), NaN where no token
    audio_times: np.ndarray | None = None  # (L,) frame centres, seconds
    audio_events: list[tuple[float, float]] = field(default_factory=list)  # seconds, view time
    frames: np.ndarray | None = None  # (T, C, H, W)
    video_depth: np.ndarray | None = None  # (T, H, W)
    video_times: np.ndarray | None = None  # (T,)
    video_boxes: list | None = None  # per frame [x0, y0, x1, y1] or None


def tokenizers(tokenizer) -> tuple[AudioTokenizer | None, VideoTokenizer | None]:
    """The audio and video tokenizers inside a model's tokenizer (itself, or the parts of an
    audio+video tokenizer)."""
    audio = tokenizer if isinstance(tokenizer, AudioTokenizer) else getattr(tokenizer, "audio", None)
    video = tokenizer if isinstance(tokenizer, VideoTokenizer) else getattr(tokenizer, "video", None)
    return (audio if isinstance(audio, AudioTokenizer) else None,
            video if isinstance(video, VideoTokenizer) else None)


def view_positions(views: int) -> list[float]:
    """Relative clip positions of the evaluation views (as mormm.data.decode places them)."""
    return [0.5] if views == 1 else [v / (views - 1) for v in range(views)]


def _labels(label: Tensor) -> list[int]:
    if label.dim() == 0:
        return [] if int(label) < 0 else [int(label)]
    return label.nonzero().flatten().tolist()  # multi-hot


def _events(meta: dict) -> list[dict]:
    ev = (meta or {}).get("event") or (meta or {}).get("events") or []
    return [ev] if isinstance(ev, dict) else list(ev)


def _audio_offset(meta: dict, config: DecodeConfig, position: float) -> float:
    """Start (seconds, in the original clip) of the audio window the decoder cropped."""
    if config.clip_seconds is None or "duration" not in (meta or {}):
        return 0.0
    sr = config.sample_rate
    slack = round(float(meta["duration"]) * sr) - round(config.clip_seconds * sr)
    return max(0, round(position * slack)) / sr


def _view_boxes(meta: dict, config: DecodeConfig, position: float, height: int, width: int) -> list | None:
    """Per model frame, the event's object box in model pixels (or None); None when the clip has
    no box annotation."""
    events = [e for e in _events(meta) if e.get("boxes")]
    media = next((m for m in (meta or {}).get("media", {}).values() if m.get("frames")), None)
    if not events or media is None:
        return None
    idx = frame_indices(int(media["frames"]), config.num_frames, config.frame_stride, position)
    # Decoding resizes the short side to frame_size, then centre-crops (torchvision rounding).
    h0, w0 = media.get("height") or height, media.get("width") or width
    scale = config.frame_size / min(h0, w0)
    top = int(round((round(h0 * scale) - height) / 2.0))
    left = int(round((round(w0 * scale) - width) / 2.0))
    boxes: list = [None] * len(idx)
    for e in events:
        for t, i in enumerate(idx):
            b = e["boxes"][i] if i < len(e["boxes"]) else None
            if b is not None:
                x0, y0, x1, y1 = b
                boxes[t] = [x0 * scale - left, y0 * scale - top, x1 * scale - left, y1 * scale - top]
    return boxes


def collect(
    batch: dict,
    out,
    tokenizer,
    config: DecodeConfig,
    modality_names: dict[int, str],
    multi_label: bool = False,
    with_maps: int = 0,
) -> tuple[list[ClipDepth], list[ClipMaps]]:
    """ClipDepth per row of the batch (clip views), and ClipMaps for the first `with_maps` rows.

    out: the model's ClassifierOutput for `batch`."""
    tokens, backbone = out.tokens, out.backbone
    if tokens.regions is None:
        raise ValueError(f"{type(tokenizer).__name__} reports no Tokens.regions, which the depth maps need")
    B = tokens.embeddings.shape[0]
    clip_index = batch.get("clip_index")
    clip_index = torch.arange(B) if clip_index is None else clip_index.cpu()
    clips = len(batch["label"])
    logits = out.logits.float().cpu()
    total = torch.zeros(clips, logits.shape[-1]).index_add_(0, clip_index, logits)
    clip_logits = total / torch.bincount(clip_index, minlength=clips).clamp(min=1)[:, None]
    probs = clip_logits.sigmoid() if multi_label else clip_logits.softmax(-1)

    depth = backbone.depth.cpu().numpy()
    regions = tokens.regions.float().cpu().numpy()  # (B, N, A, 2)
    # Summary tokens (a class token) have no extent in time: they are not part of any map.
    content = tokens.content().cpu().numpy()
    modality = tokens.modality_ids.cpu().numpy()
    segment = tokens.segment_ids.cpu().numpy()

    audio_tok, video_tok = tokenizers(tokenizer)
    logmel = lengths = None
    if audio_tok is not None and "audio" in batch:
        with torch.no_grad():
            feats = audio_tok.features(batch["audio"])  # (B, Lmax, F), normalised
        logmel = (feats * audio_tok.std + audio_tok.mean).float().cpu().numpy()
        lengths = batch.get("audio_lengths")
        lengths = [batch["audio"].shape[1]] * B if lengths is None else lengths.tolist()
    video = batch["video"].float().cpu().numpy() if video_tok is not None and "video" in batch else None

    positions = view_positions(config.eval_views)
    seen: dict[int, int] = {}
    results, pictures = [], []
    for b in range(B):
        c = int(clip_index[b])
        view = seen[c] = seen.get(c, -1) + 1
        meta = batch["meta"][c] if batch.get("meta") else {}
        position = positions[view] if view < len(positions) else 0.5
        keep = np.flatnonzero(content[b])
        mod = np.array([modality_names.get(int(m), f"modality{int(m)}") for m in modality[b, keep]])
        value = np.full(len(keep), np.nan)
        event = np.full(len(keep), np.nan)
        pics = ClipMaps()

        part = mod == "audio"
        if part.any() and logmel is not None:
            L = audio_tok.num_frames(int(lengths[b]))
            sr = audio_tok.sample_rate
            centres = maps.audio_centres(L, audio_tok.hop / sr, audio_tok.win / sr, audio_tok.n_mels)
            owner = maps.owner_map(regions[b, keep[part], :2], centres)
            value[part] = maps.pool(owner, logmel[b, :L], int(part.sum()))
            offset = _audio_offset(meta, config, position)
            spans = [(float(e["start_s"]) - offset, float(e["end_s"]) - offset)
                     for e in _events(meta) if "start_s" in e and "end_s" in e]
            if spans:
                inside = maps.interval_mask(centres[0], spans)[:, None].repeat(audio_tok.n_mels, 1)
                event[part] = maps.pool(owner, inside, int(part.sum()))
            if b < with_maps:
                pics.logmel, pics.audio_times, pics.audio_events = logmel[b, :L], centres[0], spans
                pics.audio_depth = maps.paint(owner, depth[b, keep[part]])

        part = mod == "video"
        if part.any() and video is not None:
            T, _, H, W = video[b].shape
            centres = maps.video_centres(T, video_tok.frame_rate, H, W)
            owner = maps.owner_map(regions[b, keep[part], :3], centres)
            value[part] = maps.pool(owner, maps.frame_motion(video[b]), int(part.sum()))
            boxes = _view_boxes(meta, config, position, H, W)
            if boxes is not None:
                event[part] = maps.pool(owner, maps.box_mask(boxes, H, W), int(part.sum()))
            if b < with_maps:
                pics.frames, pics.video_times, pics.video_boxes = video[b], centres[0], boxes
                pics.video_depth = maps.paint(owner, depth[b, keep[part]])

        results.append(ClipDepth(
            key=str(batch["key"][c]) if batch.get("key") else str(c),
            view=view,
            labels=_labels(batch["label"][c]),
            pred=int(probs[c].argmax()),
            prob=float(probs[c].max()),
            depth=depth[b, keep].astype(np.int64),
            modality=mod,
            segment=segment[b, keep].astype(np.int64),
            regions=regions[b, keep],
            content=value,
            event=event,
        ))
        if b < with_maps:
            pictures.append(pics)
    return results, pictures
