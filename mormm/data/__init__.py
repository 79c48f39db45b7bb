"""Data: shard writing (`mormm shards`), decoding, the LightningDataModule and the demo datasets."""

from mormm.data.datamodule import ShardDataModule
from mormm.data.decode import DecodeConfig, collate
from mormm.data.demo import ensure_demo
from mormm.data.index import DatasetIndex
from mormm.data.shards import write_shards
from mormm.data.skips import LogSkippedSamples

__all__ = [
    "DatasetIndex",
    "DecodeConfig",
    "LogSkippedSamples",
    "ShardDataModule",
    "collate",
    "ensure_demo",
    "write_shards",
]
