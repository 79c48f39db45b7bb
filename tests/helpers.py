"""Small builders and checks shared by the tests."""

import torch

from encoders.tokens import Tokens
from mormm.bench.models import randomize_router  # noqa: F401  (routers start at zero)


def random_tokens(B, N, dim, lengths=None, segments=None, seed=0, scale=1.0) -> Tokens:
    """Random tokens on 2 position axes.

    lengths:  sample b is padded after lengths[b] tokens (garbage embeddings stay in place).
    segments: None (each token its own segment), an int (contiguous segments of that many
              tokens), a list of sizes (the same contiguous segments in every sample) or a list
              of such lists (one per sample).
    """
    g = torch.Generator().manual_seed(seed)
    pad = None if lengths is None else torch.arange(N)[None] >= torch.tensor(lengths)[:, None]
    if segments is None:
        seg, num_segments, max_len = Tokens.default_segments(B, N), N, 1
    elif isinstance(segments, int):
        seg = (torch.arange(N) // segments).expand(B, N)
        num_segments, max_len = -(-N // segments), segments
    else:
        per_sample = segments if isinstance(segments[0], (list, tuple)) else [segments] * B
        seg = torch.stack([torch.repeat_interleave(torch.arange(len(s)), torch.tensor(s))
                           for s in per_sample])
        assert seg.shape == (B, N), "segment sizes must add up to N"
        num_segments = max(len(s) for s in per_sample)
        max_len = max(max(s) for s in per_sample)
    return Tokens(
        embeddings=torch.randn(B, N, dim, generator=g) * scale,
        positions=torch.rand(B, N, 2, generator=g) * 8,
        segment_ids=seg,
        modality_ids=torch.zeros(B, N, dtype=torch.long),
        padding_mask=pad,
        num_segments=num_segments,
        max_segment_len=max_len,
    )


def on_device(tokens: Tokens, device) -> Tokens:
    """The same tokens with every tensor on `device`."""
    return tokens.replace(**{k: v.to(device) for k, v in vars(tokens).items()
                             if isinstance(v, torch.Tensor)})


class NoHostSyncs:
    """Raises at any host sync inside (when `check`; CUDA only): the GPU's queue stays full."""

    def __init__(self, check: bool = True) -> None:
        self.check = check

    def __enter__(self):
        torch.cuda.synchronize()
        if self.check:
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
