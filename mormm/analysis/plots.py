"""Pictures of depth allocation (matplotlib, Agg backend: no display needed).

Every figure has a fixed size in inches and is saved without tight cropping, so a PNG is exactly
figsize x dpi pixels (`figure_pixels` says how many).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

DPI = 100
DEPTH_CMAP = "magma"


def audio_figsize() -> tuple[float, float]:
    return (10.0, 6.0)


def video_figsize(num_frames: int) -> tuple[float, float]:
    return (max(4.0, 1.5 * num_frames), 3.4)


def summary_figsize() -> tuple[float, float]:
    return (15.0, 4.0)


def figure_pixels(figsize: tuple[float, float], dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels of a figure saved by this module."""
    return round(figsize[0] * dpi), round(figsize[1] * dpi)


def _depth_style(max_depth: int) -> dict:
    """One colour per depth 0..max_depth, ticks in the middle of each colour."""
    return {"cmap": plt.get_cmap(DEPTH_CMAP, max_depth + 1), "vmin": -0.5, "vmax": max_depth + 0.5}


def _save(fig, path: Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_audio(
    path: Path,
    logmel: np.ndarray,
    depth: np.ndarray,
    times: np.ndarray,
    max_depth: int,
    events: list[tuple[float, float]] = (),
    title: str = "",
    dpi: int = DPI,
) -> Path:
    """Log-mel spectrogram (L, F) above the same spectrogram overlaid with the depth map (L, F)
    (NaN where no token), both on the time axis `times` (L,) of frame centres in seconds, and the
    mean depth per frame below. Annotated events are outlined."""
    L, F = logmel.shape
    hop = float(times[1] - times[0]) if L > 1 else 0.01
    extent = (float(times[0]) - hop / 2, float(times[-1]) + hop / 2, 0, F)
    fig, axes = plt.subplots(3, 1, figsize=audio_figsize(), sharex=True, layout="constrained",
                             gridspec_kw={"height_ratios": [3, 3, 1.2]})
    axes[0].imshow(logmel.T, origin="lower", aspect="auto", extent=extent, cmap="viridis",
                   interpolation="nearest")
    axes[0].set_ylabel("mel bin")
    axes[0].set_title(title or "log-mel")
    axes[1].imshow(logmel.T, origin="lower", aspect="auto", extent=extent, cmap="gray",
                   interpolation="nearest")
    im = axes[1].imshow(depth.T, origin="lower", aspect="auto", extent=extent, alpha=0.6,
                        interpolation="nearest", **_depth_style(max_depth))
    axes[1].set_ylabel("mel bin")
    axes[1].set_title("recursions per token")
    fig.colorbar(im, ax=axes[:2], ticks=range(max_depth + 1), label="depth", shrink=0.8)
    covered = ~np.isnan(depth)
    per_frame = np.where(covered, depth, 0).sum(1) / np.maximum(covered.sum(1), 1)  # (L,)
    per_frame[~covered.any(1)] = np.nan
    axes[2].step(times, per_frame, where="mid", color="k")
    axes[2].set_ylim(-0.1, max_depth + 0.1)
    axes[2].set_ylabel("mean depth")
    axes[2].set_xlabel("time (s)")
    for start, end in events:
        for ax in axes[:2]:
            ax.add_patch(Rectangle((start, 0), end - start, F, fill=False, ec="cyan", lw=1.5, ls="--"))
        axes[2].axvspan(start, end, color="cyan", alpha=0.25, lw=0)
    return _save(fig, path, dpi)


def plot_video(
    path: Path,
    frames: np.ndarray,
    depth: np.ndarray,
    max_depth: int,
    boxes: list | None = None,
    times: np.ndarray | None = None,
    title: str = "",
    dpi: int = DPI,
) -> Path:
    """Frames (T, C, H, W) in [0, 1] in a row, and below them the same frames (grey) with the
    per-patch depth heatmap (T, H, W). Annotated object boxes ([x0, y0, x1, y1] or None per frame)
    are outlined."""
    T = frames.shape[0]
    fig, axes = plt.subplots(2, T, figsize=video_figsize(T), squeeze=False, layout="constrained")
    im = None
    for t in range(T):
        rgb = np.clip(np.moveaxis(frames[t], 0, -1), 0, 1)
        if rgb.shape[-1] == 1:
            rgb = rgb[..., 0]
        axes[0, t].imshow(rgb, cmap="gray" if rgb.ndim == 2 else None, interpolation="nearest")
        axes[1, t].imshow(rgb.mean(-1) if rgb.ndim == 3 else rgb, cmap="gray", interpolation="nearest")
        im = axes[1, t].imshow(depth[t], alpha=0.6, interpolation="nearest", **_depth_style(max_depth))
        label = f"t={times[t]:.2f}s" if times is not None else f"frame {t}"
        axes[0, t].set_title(label, fontsize=8)
        box = boxes[t] if boxes is not None and t < len(boxes) else None
        for row in range(2):
            axes[row, t].set_xticks([])
            axes[row, t].set_yticks([])
            if box is not None:
                x0, y0, x1, y1 = box
                axes[row, t].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                                 ec="cyan", lw=1.2, ls="--"))
    if im is not None:
        fig.colorbar(im, ax=axes[1, :], ticks=range(max_depth + 1), label="depth", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def plot_summary(path: Path, summary: dict, dpi: int = DPI) -> Path:
    """Depth histogram per modality, mean depth by time position, and by class (with the event /
    background contrast when the data is annotated)."""
    fig, axes = plt.subplots(1, 3, figsize=summary_figsize(), layout="constrained")
    hist = summary["depth_histogram"]
    depths = np.arange(summary["max_depth"] + 1)
    width = 0.8 / max(1, len(hist))
    for i, (m, counts) in enumerate(hist.items()):
        counts = np.asarray(counts, dtype=np.float64)
        axes[0].bar(depths + i * width - 0.4 + width / 2, counts / max(counts.sum(), 1), width, label=m)
    axes[0].set_xticks(depths)
    axes[0].set_xlabel("depth (recursions)")
    axes[0].set_ylabel("fraction of tokens")
    axes[0].set_title("depth histogram")
    axes[0].legend()

    for m, rows in summary["depth_by_time"].items():
        axes[1].step([r["start"] for r in rows], [r["mean_depth"] for r in rows], where="post", label=m)
    axes[1].set_xlabel("token start (s)")
    axes[1].set_ylabel("mean depth")
    axes[1].set_title("depth by time position")
    axes[1].legend()

    by_class = summary["depth_by_class"]
    names = sorted(by_class)
    x = np.arange(len(names))
    axes[2].bar(x - 0.3, [by_class[n]["mean_depth"] for n in names], 0.3, label="all tokens")
    contrast = {}
    for per in summary["event_contrast"].values():
        contrast.update(per)
        break  # first modality; the JSON has all of them
    if contrast:
        ev = [(contrast.get(n) or {}).get("event_depth") for n in names]
        bg = [(contrast.get(n) or {}).get("background_depth") for n in names]
        axes[2].bar(x, [np.nan if v is None else v for v in ev], 0.3, label="event")
        axes[2].bar(x + 0.3, [np.nan if v is None else v for v in bg], 0.3, label="background")
    axes[2].set_xticks(x, names, rotation=30, ha="right")
    axes[2].set_ylabel("mean depth")
    axes[2].set_title("depth by class")
    axes[2].legend()
    return _save(fig, path, dpi)
