"""Per-clip depth records -> segments and aggregate numbers (plain numpy, no torch).

Dimension legend:
    N  content tokens of one clip (padding and summary tokens such as a class token left out)
    A  region axes (Tokens.axes)

A `ClipDepth` holds, per token, the depth the backbone gave it, its modality, routing segment,
region, one content measure of the input under it (audio: mean log-mel energy; video: mean
frame-difference motion) and the fraction of it inside an annotated event (NaN when the clip has
no annotation). Everything else here is computed from those arrays.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

# Name of the content measure per modality, as reported.
CONTENT = {"audio": "energy", "video": "motion"}
# Region axis names per modality (the first A columns of Tokens.regions for that modality).
AXES = {"audio": ("time", "freq"), "video": ("time", "height", "width")}
EVENT_INSIDE = 0.5  # a token is "in the event" when at least half of its cells are


@dataclass
class ClipDepth:
    key: str
    view: int
    labels: list[int]  # true classes (empty when unlabelled)
    pred: int
    prob: float
    depth: np.ndarray  # (N,) int recursions
    modality: np.ndarray  # (N,) str
    segment: np.ndarray  # (N,) int routing segment
    regions: np.ndarray  # (N, A, 2) [start, end) in input units (seconds, mel bins, pixels)
    content: np.ndarray  # (N,) float: energy (audio tokens) or motion (video tokens)
    event: np.ndarray  # (N,) float in [0, 1]: fraction inside the event; NaN without annotation

    @property
    def correct(self) -> bool | None:
        return None if not self.labels else self.pred in self.labels

    @property
    def annotated(self) -> bool:
        return bool(len(self.event)) and not np.isnan(self.event).all()


# -- per clip --------------------------------------------------------------------------------


def segments(clip: ClipDepth) -> list[dict]:
    """One record per routing segment: its mean depth, time span (seconds), and per modality the
    tokens, mean depth, extent along the other axes, mean content measure and event fraction."""
    out = []
    for s in np.unique(clip.segment):
        sel = clip.segment == s
        rec = {
            "segment": int(s),
            "depth": float(clip.depth[sel].mean()),
            "tokens": int(sel.sum()),
            "time": _span(clip.regions[sel, 0]),
            "modalities": {},
        }
        for m in np.unique(clip.modality[sel]):
            part = sel & (clip.modality == m)
            info = {"tokens": int(part.sum()), "depth": float(clip.depth[part].mean())}
            for a, name in enumerate(AXES.get(str(m), ())[1:], start=1):  # time is the segment's
                info[name] = _span(clip.regions[part, a])
            info[CONTENT.get(str(m), "content")] = _nanmean(clip.content[part])
            info["event"] = _nanmean(clip.event[part])
            rec["modalities"][str(m)] = info
        out.append(rec)
    return out


def clip_summary(clip: ClipDepth, class_names: list[str]) -> dict:
    """JSON-ready record of one clip: prediction, per-token depths and regions, segments."""
    name = lambda i: class_names[i] if 0 <= i < len(class_names) else i  # noqa: E731
    return {
        "key": clip.key,
        "view": clip.view,
        "labels": [name(i) for i in clip.labels],
        "pred": name(clip.pred),
        "prob": round(clip.prob, 6),
        "correct": clip.correct,
        "mean_depth": float(clip.depth.mean()) if len(clip.depth) else None,
        "tokens": {
            "depth": clip.depth.tolist(),
            "modality": clip.modality.tolist(),
            "segment": clip.segment.tolist(),
            "region": np.round(clip.regions, 6).tolist(),
            "content": [_json_float(v) for v in clip.content],
            "event": [_json_float(v) for v in clip.event],
        },
        "segments": segments(clip),
    }


# -- aggregates ------------------------------------------------------------------------------


def depth_histogram(clips: list[ClipDepth], max_depth: int) -> dict[str, list[int]]:
    """Tokens at each depth 0..max_depth, per modality."""
    out: dict[str, np.ndarray] = {}
    for c in clips:
        for m in np.unique(c.modality):
            d = c.depth[c.modality == m]
            out.setdefault(str(m), np.zeros(max_depth + 1, dtype=np.int64))
            out[str(m)] += np.bincount(d, minlength=max_depth + 1)[: max_depth + 1]
    return {m: h.tolist() for m, h in out.items()}


def depth_by_time(clips: list[ClipDepth], bin_s: float) -> dict[str, list[dict]]:
    """Mean depth of the tokens starting in each time bin [i * bin_s, (i + 1) * bin_s), per modality."""
    total: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for c in clips:
        bins = np.floor(c.regions[:, 0, 0] / bin_s + 1e-6).astype(int)
        for m, b, d in zip(c.modality, bins, c.depth):
            acc = total[str(m)][int(b)]
            acc[0] += d
            acc[1] += 1
    return {
        m: [{"start": round(b * bin_s, 6), "end": round((b + 1) * bin_s, 6), "mean_depth": s / n, "tokens": n}
            for b, (s, n) in sorted(per.items())]
        for m, per in total.items()
    }


def depth_by_group(clips: list[ClipDepth], groups_of) -> dict:
    """Mean token depth (over all tokens of the group's clips), clip count and accuracy per group;
    `groups_of(clip)` names the groups a clip belongs to."""
    acc: dict = defaultdict(lambda: [0.0, 0, 0, 0, 0])
    for c in clips:
        for g in groups_of(c):
            acc[g][0] += float(c.depth.sum())
            acc[g][1] += len(c.depth)
            acc[g][2] += 1
            if c.correct is not None:
                acc[g][3] += int(c.correct)
                acc[g][4] += 1
    return {
        g: {"mean_depth": s / max(n, 1), "clips": k, "accuracy": _json_float(r / m if m else math.nan)}
        for g, (s, n, k, r, m) in acc.items()
    }


def modality_split(clips: list[ClipDepth]) -> dict[str, dict]:
    """Per modality: share of tokens, share of all recursions (token-steps), mean depth."""
    tokens: dict[str, int] = defaultdict(int)
    steps: dict[str, float] = defaultdict(float)
    for c in clips:
        for m in np.unique(c.modality):
            sel = c.modality == m
            tokens[str(m)] += int(sel.sum())
            steps[str(m)] += float(c.depth[sel].sum())
    all_tokens, all_steps = sum(tokens.values()), sum(steps.values())
    return {
        m: {
            "token_share": tokens[m] / max(all_tokens, 1),
            "depth_share": steps[m] / max(all_steps, 1e-12),
            "mean_depth": steps[m] / max(tokens[m], 1),
        }
        for m in tokens
    }


def content_correlation(clips: list[ClipDepth], class_names: list[str]) -> dict:
    """Spearman correlation of segment depth with the segment's content measure (audio energy,
    video motion), per modality and per class ("all" for every clip): pooled over the segments of
    all the group's clips, and the mean of the within-clip correlations (what a router that ranks
    units inside each clip can influence)."""
    per: dict = defaultdict(lambda: defaultdict(lambda: {"depth": [], "content": [], "within": []}))
    for c in clips:
        groups = ["all"] + [class_names[i] if i < len(class_names) else str(i) for i in c.labels]
        for m in np.unique(c.modality):
            depth, content = _segment_means(c, m)
            ok = ~np.isnan(content)
            depth, content = depth[ok], content[ok]
            rho = spearman(depth, content)
            for g in groups:
                slot = per[str(m)][g]
                slot["depth"].append(depth)
                slot["content"].append(content)
                if not math.isnan(rho):
                    slot["within"].append(rho)
    out: dict = {}
    for m, groups in per.items():
        out[m] = {"measure": CONTENT.get(m, "content")}
        for g, slot in groups.items():
            d, x = np.concatenate(slot["depth"]), np.concatenate(slot["content"])
            out[m][g] = {
                "spearman": _json_float(spearman(d, x)),
                "within_clip_spearman": _json_float(np.mean(slot["within"]) if slot["within"] else math.nan),
                "segments": int(len(d)),
            }
    return out


def event_contrast(clips: list[ClipDepth], class_names: list[str]) -> dict:
    """Mean depth of tokens inside the annotated event vs background, per modality and class
    ("all" for every annotated clip); `clips_event_deeper` = share of clips (with both kinds of
    token) whose event tokens are deeper on average than their background tokens."""
    per: dict = defaultdict(lambda: defaultdict(lambda: {"in": [0.0, 0], "out": [0.0, 0], "wins": [0, 0]}))
    for c in clips:
        if not c.annotated:
            continue
        groups = ["all"] + [class_names[i] if i < len(class_names) else str(i) for i in c.labels]
        for m in np.unique(c.modality):
            sel = c.modality == m
            inside = sel & (c.event >= EVENT_INSIDE)
            outside = sel & (c.event < EVENT_INSIDE)
            for g in groups:
                slot = per[str(m)][g]
                slot["in"][0] += float(c.depth[inside].sum())
                slot["in"][1] += int(inside.sum())
                slot["out"][0] += float(c.depth[outside].sum())
                slot["out"][1] += int(outside.sum())
                if inside.any() and outside.any():
                    slot["wins"][0] += int(c.depth[inside].mean() > c.depth[outside].mean())
                    slot["wins"][1] += 1
    out: dict = {}
    for m, groups in per.items():
        out[m] = {}
        for g, slot in groups.items():
            ein = slot["in"][0] / slot["in"][1] if slot["in"][1] else math.nan
            eout = slot["out"][0] / slot["out"][1] if slot["out"][1] else math.nan
            out[m][g] = {
                "event_depth": _json_float(ein),
                "background_depth": _json_float(eout),
                "difference": _json_float(ein - eout),
                "event_tokens": slot["in"][1],
                "background_tokens": slot["out"][1],
                "clips_event_deeper": _json_float(slot["wins"][0] / slot["wins"][1] if slot["wins"][1] else math.nan),
            }
    return out


def aggregate(clips: list[ClipDepth], class_names: list[str], max_depth: int, time_bin_s: float) -> dict:
    """Every aggregate of the analysis, JSON-ready."""
    name = lambda i: class_names[i] if 0 <= i < len(class_names) else str(i)  # noqa: E731
    labelled = [c for c in clips if c.labels]
    all_tokens = sum(len(c.depth) for c in clips)
    return {
        "clips": len(clips),
        "tokens": all_tokens,
        "accuracy": _json_float(np.mean([c.correct for c in labelled]) if labelled else math.nan),
        "mean_depth": _json_float(sum(float(c.depth.sum()) for c in clips) / all_tokens if all_tokens else math.nan),
        "max_depth": max_depth,
        "depth_histogram": depth_histogram(clips, max_depth),
        "depth_by_time": depth_by_time(clips, time_bin_s),
        "depth_by_class": depth_by_group(labelled, lambda c: [name(i) for i in c.labels]),
        "depth_by_prediction": depth_by_group(clips, lambda c: [name(c.pred)]),
        "depth_by_correct": depth_by_group(labelled, lambda c: ["correct" if c.correct else "incorrect"]),
        "modality_split": modality_split(clips),
        "content_correlation": content_correlation(clips, class_names),
        "event_contrast": event_contrast(clips, class_names),
    }


# -- helpers ---------------------------------------------------------------------------------


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant or
    there are fewer than 3 points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def _ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (first + (counts - 1) / 2)[inverse]  # average rank of each tie group


def _segment_means(c: ClipDepth, modality) -> tuple[np.ndarray, np.ndarray]:
    """(S,) mean depth and mean content of the clip's segments, over the modality's tokens."""
    sel = c.modality == modality
    seg = c.segment[sel]
    ids, inv = np.unique(seg, return_inverse=True)
    count = np.bincount(inv, minlength=len(ids))
    depth = np.bincount(inv, weights=c.depth[sel], minlength=len(ids)) / count
    content = c.content[sel]
    ok = ~np.isnan(content)
    n_ok = np.bincount(inv[ok], minlength=len(ids))
    total = np.bincount(inv[ok], weights=content[ok], minlength=len(ids))
    with np.errstate(invalid="ignore", divide="ignore"):
        return depth, np.where(n_ok > 0, total / np.maximum(n_ok, 1), np.nan)


def _span(regions: np.ndarray) -> list[float]:
    """(n, 2) [start, end) -> the [start, end) covering them all, rounded like the inputs' units."""
    return [round(float(regions[:, 0].min()), 6), round(float(regions[:, 1].max()), 6)]


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return None if not len(x) or np.isnan(x).all() else float(np.nanmean(x))


def _json_float(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v
