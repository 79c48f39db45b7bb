"""Pooling heads: what they change in the token record before the backbone."""

import torch

from encoders import VideoTokenizer
from mormm.heads import ClassTokenPooling


def test_class_token_gets_its_own_segment_and_ends_the_block_layout():
    tokens = VideoTokenizer(16, patch_size=8, segment="token")(torch.rand(2, 4, 3, 16, 16))
    assert tokens.contiguous_segments  # one token per segment, in order
    out = ClassTokenPooling(16).prepare(tokens)
    N = tokens.embeddings.shape[1]
    assert out.embeddings.shape[1] == N + 1 and out.num_segments == tokens.num_segments + 1
    assert out.segment_ids[0, 0] == tokens.num_segments  # first, with the new id
    # Still N = num_segments x max_segment_len, but segment u no longer starts at token u.
    assert not out.contiguous_segments
