"""Audio tokenizer: waveform -> log-mel -> time x frequency patches (AST) or frame groups (KWT).

Dimension legend:
    B  batch
    S  waveform samples (zero-padded to the longest clip)
    L  valid frames of the log-mel map; Lmax = frames of S samples
    F  mel bins (n_mels)
    pt, pf  frames and mel bins per token (frame groups: pf = F)
    n, f  token grid: time steps ceil(Lmax / pt), frequency patches F // pf
    N  tokens = n * f, ordered (time, frequency) row-major
    D  embedding width

Framing is "snip edges" (Kaldi) / centre=False: frame i covers samples
[i * hop, i * hop + win), and a clip of `length` samples has L = 1 + (length - win) // hop frames,
all lying wholly inside the clip. Features are per frame (log(mel + eps), then a fixed dataset
mean/std; no per-utterance statistics), so a frame never depends on samples outside its window.

Padding rule: token k spans frames [k * pt, (k + 1) * pt); it is padding iff k * pt >= L, i.e.
iff it starts at or after the clip's last valid frame. A token that straddles the end is real;
its frames past L are set to 0 (the dataset mean after normalisation) rather than computed from
the zero padding, so a clip's tokens do not depend on the batch it is in. Consequently the same
clip at two lengths gives identical tokens wherever the token's frames are valid in both.

Positions are (time step, frequency patch) indices; regions are the exact sample support in
seconds ([k*pt*hop, ((k+1)*pt - 1)*hop + win) / sample_rate, so neighbours overlap by win - hop)
and mel-bin spans. Segments are time windows of `segment_seconds` (by token start time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from .positions import grid_positions, maybe_learned
from .tokens import Tokens

# AudioSet statistics of 128-bin Kaldi fbank at 16 kHz, as published with AST. Recompute them
# for your dataset and frontend; they only need to bring features to roughly zero mean/unit std.
AST_MEAN, AST_STD = -4.2677393, 4.5689974
LAYOUTS = ("patches", "frames")
FRONTENDS = ("mel", "kaldi")


class AudioTokenizer(nn.Module):
    """(B, S) waveform + (B,) lengths -> Tokens with axes ("time", "freq").

    dim:              embedding width D.
    sample_rate:      expected rate; a batch carrying another "sample_rate" raises ValueError.
    n_mels:           mel bins F.
    win_ms, hop_ms:   analysis window and hop (25 ms / 10 ms as AST and Kaldi).
    frontend:         "mel" = batched torchaudio MelSpectrogram (HTK mel scale, Hann window,
                      power 2, log(mel + eps)); "kaldi" = torchaudio.compliance.kaldi.fbank per
                      clip (AST's features: dither 0, subtract_mean False, snip_edges True).
    n_fft:            FFT size of the "mel" frontend (window zero-padded); None = the larger of
                      1024 and the next power of two >= the window, which keeps all 128 mel
                      filters non-empty at 16 kHz.
    mean, std:        dataset statistics: features become (logmel - mean) / std.
    layout:           "patches" = pt x pf time-frequency patches (AST, patch_size);
                      "frames" = groups of frames_per_token frames x all bins (KWT-like).
    patch_size:       (pt, pf) for "patches"; n_mels must be a multiple of pf.
    frames_per_token: pt for "frames".
    freq_mask, time_mask: SpecAugment maximum widths (mel bins, frames), torchaudio
                      FrequencyMasking / TimeMasking, training mode only; 0 disables.
    segment_seconds:  routing window length; None = one token time step (all frequency patches
                      of the same frames, the audio analogue of a video tubelet slice).
    learned_pos_grid: None = rotary only; (n, f) = also add learned factorised embeddings
                      (cropped in time for shorter clips, interpolated for longer ones).
    modality_id:      value of Tokens.modality_ids.
    """

    input_keys: tuple[str, ...] = ("audio", "audio_lengths", "sample_rate")

    def __init__(
        self,
        dim: int,
        sample_rate: int = 16000,
        n_mels: int = 128,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        frontend: str = "mel",
        n_fft: int | None = None,
        mean: float = AST_MEAN,
        std: float = AST_STD,
        layout: str = "patches",
        patch_size: tuple[int, int] = (16, 16),
        frames_per_token: int = 4,
        freq_mask: int = 24,
        time_mask: int = 48,
        segment_seconds: float | None = None,
        learned_pos_grid: tuple[int, int] | None = None,
        modality_id: int = 0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        pt, pf = (tuple(patch_size) if layout == "patches" else (frames_per_token, n_mels))
        if pt < 1 or pf < 1 or n_mels % pf:
            raise ValueError(
                f"token size (frames, bins) = ({pt}, {pf}) must be positive and divide "
                f"n_mels={n_mels} along frequency"
            )
        if std <= 0 or (segment_seconds is not None and segment_seconds <= 0):
            raise ValueError(
                f"std and segment_seconds must be positive, got {std}, {segment_seconds}"
            )
        self.dim, self.sample_rate, self.n_mels = dim, sample_rate, n_mels
        # Samples per frame and between frames, truncated exactly as Kaldi's fbank computes them,
        # so both front ends agree with the grid at any rate (11025 Hz: 275, not 276).
        self.win = int(sample_rate * win_ms * 0.001)
        self.hop = int(sample_rate * hop_ms * 0.001)
        self.frontend, self.mean, self.std, self.eps = frontend, mean, std, eps
        self.layout, self.pt, self.pf = layout, pt, pf
        self.segment_seconds, self.modality_id = segment_seconds, modality_id
        self.win_ms, self.hop_ms = win_ms, hop_ms

        if frontend == "mel":
            self.n_fft = n_fft or max(1024, 1 << (self.win - 1).bit_length())
            if self.n_fft < self.win:
                raise ValueError(f"n_fft={self.n_fft} is shorter than the window ({self.win})")
            self.melspec = torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=self.n_fft, win_length=self.win,
                hop_length=self.hop, f_min=20.0, n_mels=n_mels, center=False, power=2.0,
                mel_scale="htk",
            )
        # iid_masks: a different mask per clip rather than one for the whole batch.
        self.spec_augment = nn.Sequential(
            torchaudio.transforms.FrequencyMasking(freq_mask, iid_masks=True),
            torchaudio.transforms.TimeMasking(time_mask, iid_masks=True),
        ) if (freq_mask or time_mask) else None
        # One Conv2d covers both layouts: a frame group is a patch spanning every mel bin.
        self.proj = nn.Conv2d(1, dim, kernel_size=(pt, pf), stride=(pt, pf))
        self.pos_embed = maybe_learned(dim, learned_pos_grid, num_axes=2)

    # -- static geometry (Python ints from shapes and config) -------------------------------

    def num_frames(self, samples: int) -> int:
        """Frames wholly inside `samples` samples (0 when shorter than one window)."""
        return 0 if samples < self.win else 1 + (samples - self.win) // self.hop

    def grid(self, samples: int) -> tuple[int, int]:
        """(n, f) token grid for a waveform of `samples` samples (a partial last group counts)."""
        return math.ceil(self.num_frames(samples) / self.pt), self.n_mels // self.pf

    @property
    def step_seconds(self) -> float:
        """Time between consecutive token starts: the step of the time position axis."""
        return self.pt * self.hop / self.sample_rate

    def segments(self, n: int, f: int) -> tuple[list[int], int, int]:
        """Segment id per time step, num_segments and max_segment_len for an (n, f) grid."""
        if self.segment_seconds is None:
            return list(range(n)), n, f
        # Integer sample arithmetic: a token starting at sample s lies in window s // window.
        window = round(self.segment_seconds * self.sample_rate)
        ids = [k * self.pt * self.hop // window for k in range(n)]
        return ids, ids[-1] + 1, max(ids.count(i) for i in set(ids)) * f

    def regions(self, n: int, f: int, device=None) -> Tensor:
        """(N, 2, 2) [start, end): seconds of the exact sample support, mel bins."""
        pos = grid_positions((n, f), device=device)  # (N, 2)
        t0 = pos[:, 0] * (self.pt * self.hop)  # first sample of the first frame
        t1 = t0 + (self.pt - 1) * self.hop + self.win  # one past the last frame's last sample
        time = torch.stack((t0, t1), -1) / self.sample_rate  # (N, 2)
        freq = torch.stack((pos[:, 1] * self.pf, (pos[:, 1] + 1) * self.pf), -1)  # (N, 2)
        return torch.stack((time, freq), dim=1)  # (N, 2, 2)

    # -- forward ----------------------------------------------------------------------------

    def check(self, audio: Tensor, audio_lengths: Tensor | None, sample_rate) -> bool:
        """Raise a ValueError naming what is wrong with the batch; True when audio_lengths says
        every clip fills all S samples (nothing is padded)."""
        if sample_rate is not None:
            rates = torch.as_tensor(sample_rate).reshape(-1).tolist()
            if any(r != self.sample_rate for r in rates):
                raise ValueError(
                    f"sample_rate mismatch: tokenizer expects {self.sample_rate} Hz, batch has "
                    f"{sorted(set(rates))}"
                )
        if audio.dim() != 2:
            raise ValueError(f"audio must be (B, S) waveforms, got shape {tuple(audio.shape)}")
        B, S = audio.shape
        if S < self.win:
            raise ValueError(
                f"audio has S={S} samples, fewer than one {self.win}-sample window "
                f"(shape {tuple(audio.shape)}): empty clip"
            )
        if audio_lengths is None:
            return True
        if audio_lengths.shape != (B,):
            raise ValueError(
                f"audio_lengths must be (B={B},), got shape {tuple(audio_lengths.shape)}"
            )
        # One small host sync to name bad clips; cheap next to the spectrogram.
        lo, hi = torch.stack(audio_lengths.aminmax()).tolist()
        if lo < self.win or hi > S:
            bad = (audio_lengths < self.win) | (audio_lengths > S)
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"audio_lengths must be in [{self.win}, S={S}] samples (at least one window); "
                f"clips {idx} have {audio_lengths[idx].tolist()}: empty clip or length past S"
            )
        return lo == S

    def features(self, audio: Tensor) -> Tensor:
        """(B, S) waveform -> (B, Lmax, F) normalised log-mel frames, computed in float32."""
        with torch.autocast(audio.device.type, enabled=False):
            audio = audio.float()
            if self.frontend == "kaldi":
                frames = torch.stack([
                    torchaudio.compliance.kaldi.fbank(
                        clip[None], sample_frequency=self.sample_rate,
                        num_mel_bins=self.n_mels, frame_length=self.win_ms,
                        frame_shift=self.hop_ms, htk_compat=True, window_type="hanning",
                        dither=0.0, use_energy=False, subtract_mean=False, snip_edges=True,
                    )
                    for clip in audio
                ])  # (B, Lmax, F); fbank is per clip, hence the loop
            else:
                # torch.stft centres the win-sample window inside n_fft; padding both ends by
                # half the difference makes frame i cover exactly samples [i*hop, i*hop + win).
                half = (self.n_fft - self.win) // 2
                padded = F.pad(audio, (half, self.n_fft - self.win - half))
                mel = self.melspec(padded)  # (B, F, Lmax)
                frames = torch.log(mel + self.eps).transpose(1, 2)  # (B, Lmax, F)
        return (frames - self.mean) / self.std

    def embed_features(self, frames: Tensor, num_valid: Tensor | None) -> Tensor:
        """(B, Lmax, F) frames + (B,) valid frame counts -> (B, N, D) embeddings."""
        B, Lmax, _ = frames.shape
        if num_valid is not None:
            # Frames past a clip's end -> 0 (dataset mean), independent of the zero padding.
            live = torch.arange(Lmax, device=frames.device) < num_valid[:, None]  # (B, Lmax)
            frames = frames * live[..., None]
        if self.training and self.spec_augment is not None:
            # SpecAugment wants (..., freq, time); masked values are 0 = the dataset mean.
            frames = self.spec_augment(frames.transpose(1, 2)[:, None])[:, 0].transpose(1, 2)
        n = math.ceil(Lmax / self.pt)
        frames = F.pad(frames, (0, 0, 0, n * self.pt - Lmax))  # (B, n * pt, F)
        x = self.proj(frames[:, None].to(self.proj.weight.dtype))  # (B, D, n, f)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), (time, freq) row-major

    def forward(
        self, audio: Tensor, audio_lengths: Tensor | None = None, sample_rate=None
    ) -> Tokens:
        if self.check(audio, audio_lengths, sample_rate):
            # Nothing padded: no mask, so the backbone keeps its exact routing and unmasked
            # (flash) attention.
            audio_lengths = None
        B, S = audio.shape
        n, f = self.grid(S)
        N = n * f
        num_valid = None
        if audio_lengths is not None:
            num_valid = (audio_lengths.to(audio.device) - self.win).div(
                self.hop, rounding_mode="floor") + 1  # (B,) frames wholly inside each clip
        x = self.embed_features(self.features(audio), num_valid)  # (B, N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed((n, f)).to(x.dtype)
        device = x.device
        pos = grid_positions((n, f), device=device)  # (N, 2)
        padding_mask = None
        if num_valid is not None:
            # Token (k, .) is padding iff its first frame k * pt is at or past the clip's end.
            padding_mask = (pos[:, 0] * self.pt)[None] >= num_valid[:, None]  # (B, N)
        seg, num_segments, max_len = self.segments(n, f)
        seg = torch.tensor(seg, device=device).repeat_interleave(f)  # (N,)
        return Tokens(
            embeddings=x,
            positions=pos.expand(B, N, 2),
            segment_ids=seg.expand(B, N),
            modality_ids=torch.full((B, N), self.modality_id, dtype=torch.long, device=device),
            padding_mask=padding_mask,
            num_segments=num_segments,
            max_segment_len=max_len,
            regions=self.regions(n, f, device=device).expand(B, N, 2, 2),
            axes=("time", "freq"),
            # Ids rise with time; windows of equal length then lie one after the other.
            contiguous_segments=num_segments * max_len == N,
        )
