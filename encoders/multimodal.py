"""Audio + video in one token sequence on a shared time axis.

Dimension legend:
    B  batch
    Na, Nv  audio and video tokens;  N = Na + Nv (audio first, then video)
    D  embedding width (the same for both sub-tokenizers)
    A  3 position axes, shared as ("time", "freq|height", "width"):
           audio (t, frequency patch, 0), video (t, row, column)

Time positions are token start times in units of `time_unit` seconds (position = start /
time_unit), so rotary attention sees both modalities on one clock; with the default time_unit =
the audio token step, audio time positions stay the integers an audio-only model sees and video
slices land on (possibly fractional) positions in between. The two spatial axes mean different
things per modality (mel patches vs pixel rows); the learned modality embedding tells them apart.

Segments are shared time windows of `segment_seconds`: a token starting at s seconds lies in
window floor(s / segment_seconds), whatever its modality, so a window's audio and video tokens
share one routing decision. Regions keep each modality's input units (seconds; mel bins or pixel
rows; 0 or pixel columns), read them together with modality_ids.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio import AudioTokenizer
from .tokens import Tokens
from .video import VideoTokenizer

# Start times are multiples of rational steps (e.g. 0.16 s, 0.08 s); a tiny slack keeps
# floor(0.48 / 0.16) from landing on 2.9999.
_SLACK = 1e-6


def _window_ids(starts: list[float], window: float) -> list[int]:
    return [math.floor(s / window + _SLACK) for s in starts]


class AudioVideoTokenizer(nn.Module):
    """Batch with "audio", "audio_lengths", ("sample_rate"), "video" -> one Tokens record.

    audio, video:    the sub-tokenizers (passed as objects, e.g. class_path/init_args in YAML);
                     they must share `dim`. Their own segment settings are ignored here.
    segment_seconds: shared routing window; None = one video tubelet slice.
    time_unit:       seconds per step of the shared time position axis; None = the audio token
                     step (patch frames x hop).
    """

    def __init__(
        self,
        audio: AudioTokenizer,
        video: VideoTokenizer,
        segment_seconds: float | None = None,
        time_unit: float | None = None,
    ) -> None:
        super().__init__()
        if audio.dim != video.dim:
            raise ValueError(f"audio dim {audio.dim} != video dim {video.dim}")
        self.audio, self.video = audio, video
        self.dim = audio.dim
        self.segment_seconds = segment_seconds or video.slice_seconds
        self.time_unit = time_unit or audio.step_seconds
        if self.segment_seconds <= 0 or self.time_unit <= 0:
            raise ValueError(
                f"segment_seconds and time_unit must be positive, got "
                f"{self.segment_seconds}, {self.time_unit}"
            )
        # (2, D): row 0 audio, row 1 video
        self.modality_embed = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(2, self.dim), std=0.02)
        )

    @property
    def input_keys(self) -> tuple[str, ...]:
        return self.audio.input_keys + self.video.input_keys

    def segments(self, n_audio: int, f: int, n_video: int, hw: int) -> tuple[Tensor, int, int]:
        """(N,) shared window ids, num_segments, max_segment_len from the two token grids."""
        w = self.segment_seconds
        a_ids = _window_ids([k * self.audio.step_seconds for k in range(n_audio)], w)
        v_ids = _window_ids([k * self.video.slice_seconds for k in range(n_video)], w)
        num_segments = max(a_ids + v_ids) + 1
        size = [0] * num_segments
        for i in a_ids:
            size[i] += f
        for i in v_ids:
            size[i] += hw
        ids = [i for i in a_ids for _ in range(f)] + [i for i in v_ids for _ in range(hw)]
        return torch.tensor(ids), num_segments, max(size)

    def forward(
        self,
        audio: Tensor,
        video: Tensor,
        audio_lengths: Tensor | None = None,
        sample_rate=None,
    ) -> Tokens:
        if video.dim() >= 1 and audio.dim() >= 1 and video.shape[0] != audio.shape[0]:
            raise ValueError(
                f"audio and video batch sizes differ: audio {tuple(audio.shape)}, "
                f"video {tuple(video.shape)}"
            )
        if audio.dim() == 2 and video.dim() == 5:
            # One shared time axis only makes sense over one span of time (shapes are static).
            a_s = audio.shape[1] / self.audio.sample_rate
            v_s = video.shape[1] / self.video.frame_rate
            if abs(a_s - v_s) > max(self.video.slice_seconds, self.audio.step_seconds):
                raise ValueError(
                    f"audio covers {a_s:.3f} s ({audio.shape[1]} samples at "
                    f"{self.audio.sample_rate} Hz) but video covers {v_s:.3f} s ({video.shape[1]} "
                    f"frames at frame_rate={self.video.frame_rate}); decode both over the same clip "
                    f"(data.clip_seconds) and check the video tokenizer's frame_rate"
                )
        a = self.audio(audio, audio_lengths, sample_rate)
        v = self.video(video)
        B, Na, _ = a.embeddings.shape
        Nv = v.embeddings.shape[1]
        device = a.embeddings.device
        n_audio, f = self.audio.grid(audio.shape[1])
        n_video, h, w = self.video.grid(tuple(video.shape))

        x = torch.cat(
            (a.embeddings + self.modality_embed[0], v.embeddings + self.modality_embed[1]), dim=1
        )  # (B, N, D)
        # Shared time axis in time_unit steps; audio gets a zero width axis.
        a_pos = a.positions * torch.tensor(
            [self.audio.step_seconds / self.time_unit, 1.0], device=device)
        v_pos = v.positions * torch.tensor(
            [self.video.slice_seconds / self.time_unit, 1.0, 1.0], device=device)
        positions = torch.cat((F.pad(a_pos, (0, 1)), v_pos), dim=1)  # (B, N, 3)
        regions = torch.cat((F.pad(a.regions, (0, 0, 0, 1)), v.regions), dim=1)  # (B, N, 3, 2)
        padding_mask = None
        if a.padding_mask is not None:
            padding_mask = torch.cat(
                (a.padding_mask, torch.zeros(B, Nv, dtype=torch.bool, device=device)), dim=1
            )  # (B, N): video is never padded
        seg, num_segments, max_len = self.segments(n_audio, f, n_video, h * w)
        return Tokens(
            embeddings=x,
            positions=positions,
            segment_ids=seg.to(device).expand(B, Na + Nv),
            modality_ids=torch.cat((a.modality_ids, v.modality_ids), dim=1),
            padding_mask=padding_mask,
            num_segments=num_segments,
            max_segment_len=max_len,
            regions=regions,
            axes=("time", "freq|height", "width"),
        )
