"""Modality tokenizers: raw batches -> one `Tokens` record the backbone consumes as is."""

from .audio import AudioTokenizer
from .image import ImageTokenizer
from .multimodal import AudioVideoTokenizer
from .positions import AxialPositionEmbedding, grid_positions
from .tokens import Tokens
from .video import VideoTokenizer

__all__ = [
    "AudioTokenizer",
    "AudioVideoTokenizer",
    "AxialPositionEmbedding",
    "ImageTokenizer",
    "Tokens",
    "VideoTokenizer",
    "grid_positions",
]
