"""Token values -> dense maps over the input (time x mel bins, frames x rows x columns).

Dimension legend:
    N  tokens of one clip          A  region axes of one modality (audio: time, freq; video: time, h, w)
    L  spectrogram frames          F  mel bins
    T  video frames                H, W  frame pixels

Every map is built the same way: a grid of cells with known centres (in the units of
Tokens.regions: seconds, mel bins, pixels) and, per cell, the token that *owns* it: the token
whose region contains the cell centre. Audio tokens' regions overlap (a token's last window
reaches win - hop past the next token's start), so where several regions contain a centre the
token whose region centre is nearest wins; with frame centres at i * hop + win / 2 this gives
every frame to exactly the token whose patch holds it. Owner maps turn any per-token value into
a picture (`paint`) and any input measure into a per-token value (`pool`), with one geometry.
"""

from __future__ import annotations

import numpy as np

NO_TOKEN = -1


def owner_map(regions: np.ndarray, centres: list[np.ndarray]) -> np.ndarray:
    """(N, A, 2) [start, end) regions + one (n_a,) ascending array of cell centres per axis ->
    (n_1, ..., n_A) int index of the token owning each cell (NO_TOKEN where none covers it)."""
    regions = np.asarray(regions, dtype=np.float64)
    if regions.ndim != 3 or regions.shape[1] != len(centres) or regions.shape[2] != 2:
        raise ValueError(
            f"regions must be (N, A={len(centres)}, 2) to match the grid's axes, got {regions.shape}"
        )
    shape = tuple(len(c) for c in centres)
    owner = np.full(shape, NO_TOKEN, dtype=np.int64)
    best = np.full(shape, np.inf)
    mid = regions.mean(-1)  # (N, A)
    half = np.maximum((regions[..., 1] - regions[..., 0]) / 2, 1e-12)  # (N, A)
    for n in range(regions.shape[0]):
        # Cells whose centre lies in [start, end) on every axis: one box of the grid.
        box, dist = [], 0.0
        for a, c in enumerate(centres):
            lo, hi = np.searchsorted(c, regions[n, a], side="left")
            if lo >= hi:
                break
            box.append(slice(lo, hi))
            d = np.abs(c[lo:hi] - mid[n, a]) / half[n, a]  # relative distance to the centre
            dist = dist + d.reshape([-1 if i == a else 1 for i in range(len(centres))])
        else:
            box = tuple(box)
            closer = dist < best[box]
            best[box] = np.where(closer, dist, best[box])
            owner[box] = np.where(closer, n, owner[box])
    return owner


def paint(owner: np.ndarray, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """Per-token values (N,) -> the map of the owner grid (`fill` where no token)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(owner.shape, fill, dtype=np.float64)
    hit = owner != NO_TOKEN
    out[hit] = values[owner[hit]]
    return out


def pool(owner: np.ndarray, grid: np.ndarray, num_tokens: int) -> np.ndarray:
    """Mean of `grid` (same shape as owner, or with extra trailing axes averaged too) over each
    token's cells -> (num_tokens,); NaN for a token that owns no cell."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.shape[: owner.ndim] != owner.shape:
        raise ValueError(f"grid {grid.shape} does not start with the owner map's shape {owner.shape}")
    grid = grid.reshape(*owner.shape, -1).mean(-1)
    hit = owner != NO_TOKEN
    total = np.bincount(owner[hit], weights=grid[hit], minlength=num_tokens)
    count = np.bincount(owner[hit], minlength=num_tokens)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# -- grids of the two input kinds ----------------------------------------------------------------


def audio_centres(num_frames: int, hop_s: float, win_s: float, n_mels: int) -> list[np.ndarray]:
    """Cell centres of a (L, F) log-mel map: frame i is shown at its window centre
    i * hop + win / 2 (seconds); bin j at j + 0.5 (mel bins)."""
    return [np.arange(num_frames) * hop_s + win_s / 2, np.arange(n_mels) + 0.5]


def video_centres(num_frames: int, frame_rate: float, height: int, width: int) -> list[np.ndarray]:
    """Cell centres of a (T, H, W) frame stack: frame t at (t + 0.5) / frame_rate seconds, pixel
    (y, x) at (y + 0.5, x + 0.5)."""
    return [(np.arange(num_frames) + 0.5) / frame_rate, np.arange(height) + 0.5, np.arange(width) + 0.5]


def frame_motion(frames: np.ndarray) -> np.ndarray:
    """(T, C, H, W) frames -> (T, H, W) motion: mean over channels of |frame t - frame t-1|; the
    first frame takes the second's difference (it has no predecessor)."""
    frames = np.asarray(frames, dtype=np.float64)
    if frames.shape[0] < 2:
        return np.zeros((frames.shape[0], *frames.shape[2:]))
    diff = np.abs(np.diff(frames, axis=0)).mean(1)  # (T-1, H, W)
    return np.concatenate([diff[:1], diff], axis=0)


def interval_mask(centres: np.ndarray, spans: list[tuple[float, float]]) -> np.ndarray:
    """(n,) bool: centres inside any [start, end) span."""
    inside = np.zeros(len(centres), dtype=bool)
    for start, end in spans:
        inside |= (centres >= start) & (centres < end)
    return inside


def box_mask(frames: list[list[float] | None], height: int, width: int) -> np.ndarray:
    """Per frame an [x0, y0, x1, y1] box in pixels or None -> (T, H, W) bool of pixel centres
    inside the box."""
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    out = np.zeros((len(frames), height, width), dtype=bool)
    for t, b in enumerate(frames):
        if b is not None:
            x0, y0, x1, y1 = b
            out[t] = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return out
