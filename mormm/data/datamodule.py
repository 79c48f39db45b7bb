"""LightningDataModule over mormm shards (or a built-in demo).

Training streams shards (webdataset): shard and sample shuffling, split over ranks and workers,
and exactly `batches_per_epoch` batches on every rank, so uneven shards can never leave one rank
waiting in a collective. Evaluation reads samples by position (tar offsets from the shards'
headers): rank r takes samples r, r + world, ..., so across ranks every sample is seen exactly
once, with no padding duplicates and no streaming order to agree on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Literal

import lightning as L
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mormm.data.decode import DecodeConfig, DecodedSample, SampleDecoder, collate
from mormm.data.demo import DEMO_KINDS, ensure_demo
from mormm.data.index import DatasetIndex, TarSample, index_tar
from mormm.data.skips import SkipCounter

DEMO_PREFIX = "demo:"
STAGES = ("train", "val", "test")


def _split_by_rank(urls, rank: int, world: int):
    """Node splitter with rank and world passed explicitly (webdataset's split_by_node reads them
    from the environment, which is not always set in DataLoader workers)."""
    for i, url in enumerate(urls):
        if i % world == rank:
            yield url


class EvalStream(IterableDataset):
    """This rank's evaluation samples, split over DataLoader workers, decoded and batched.

    Undecodable samples are skipped and counted; batches stay non-empty (a partial last batch per
    worker), so a skipped sample never produces an empty batch."""

    def __init__(
        self,
        samples: list[TarSample],
        decode: Callable[[dict], DecodedSample],
        collate_fn: Callable[[list[DecodedSample]], dict],
        batch_size: int,
        num_workers: int,
        skips: SkipCounter,
    ):
        self.samples = samples
        self.decode = decode
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.skips = skips

    def _worker_samples(self, worker: int) -> list[TarSample]:
        return self.samples[worker :: self.num_workers]

    def __len__(self) -> int:  # batches; exact unless samples are skipped
        return sum(math.ceil(len(self._worker_samples(w)) / self.batch_size) for w in range(self.num_workers))

    def __iter__(self):
        info = get_worker_info()
        batch: list[DecodedSample] = []
        for tar_sample in self._worker_samples(0 if info is None else info.id):
            try:
                batch.append(self.decode(tar_sample.read()))
            except Exception as exn:
                self.skips(exn)
                continue
            if len(batch) == self.batch_size:
                yield self.collate_fn(batch)
                batch = []
        if batch:
            yield self.collate_fn(batch)


class ShardDataModule(L.LightningDataModule):
    """Batches from mormm shards (see mormm.data.decode.collate for the batch format).

    Args:
        dataset: folder (or index.json) written by `mormm shards`, or "demo:audio", "demo:video",
            "demo:audio_video" for the built-in demo (generated into the cache on first use).
        modalities: subset of the dataset's modalities to load; default all of them.
        batch_size: clips per batch (per rank).
        num_workers: DataLoader worker processes per rank.
        sample_rate: audio is resampled to this rate.
        clip_seconds: audio crop length (random in training, centred / spread over views in
            evaluation); None keeps whole clips, padded per batch.
        num_frames, frame_stride: video frames per clip and the step between them.
        frame_size: frames are resized (short side) and cropped to frame_size x frame_size.
        eval_views: clips per sample in val/test (stacked into the batch, see clip_index).
        train_mode: "resampled" draws shards with replacement (any shard count works); "epoch"
            streams each rank's own shards without replacement (needs >= world size shards).
        batches_per_epoch: training batches per rank per epoch; default train samples / (batch
            size x world size).
        shuffle_buffer: samples held in the training shuffle buffer.
        cache_dir: demo cache root (default $MORMM_CACHE or ~/.cache/mormm).
    """

    def __init__(
        self,
        dataset: str = "demo:audio",
        modalities: list[str] | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        sample_rate: int = 16_000,
        clip_seconds: float | None = None,
        num_frames: int = 8,
        frame_stride: int = 2,
        frame_size: int = 32,
        eval_views: int = 1,
        train_mode: Literal["resampled", "epoch"] = "resampled",
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if dataset.startswith(DEMO_PREFIX):
            kind = dataset.removeprefix(DEMO_PREFIX)
            if kind not in DEMO_KINDS:
                raise ValueError(f"dataset={dataset!r}: demos are {', '.join(DEMO_PREFIX + k for k in DEMO_KINDS)}")
            dataset = str(ensure_demo(kind, cache_dir=cache_dir))
        self.index = DatasetIndex.load(dataset)
        modalities = list(modalities or self.index.modalities)
        if not modalities:
            raise ValueError(
                f"{self.index.root}: no modality is shared by every sample (audio-only and video-only files are "
                f"mixed); write audio and video datasets to separate shard folders"
            )
        missing = set(modalities) - set(self.index.modalities)
        if missing:
            raise ValueError(
                f"modalities {sorted(missing)} are not in every sample of {self.index.root} "
                f"(it has: {', '.join(self.index.modalities) or 'none'}); set data.modalities to a subset"
            )
        if train_mode not in ("resampled", "epoch"):
            raise ValueError(f"train_mode={train_mode!r}: choose 'resampled' or 'epoch'")
        self.decode_config = DecodeConfig(
            modalities=tuple(modalities),
            sample_rate=sample_rate,
            clip_seconds=clip_seconds,
            num_frames=num_frames,
            frame_stride=frame_stride,
            frame_size=frame_size,
            eval_views=eval_views,
        )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_mode = train_mode
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.skip_counters = {stage: SkipCounter(stage, num_workers) for stage in STAGES}
        self._eval_samples: dict[str, list[TarSample]] = {}

    # -- what the model needs to know, available right after construction --------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.index.classes)

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    @property
    def multi_label(self) -> bool:
        return self.index.multi_label

    @property
    def modalities(self) -> list[str]:
        return list(self.decode_config.modalities)

    @property
    def sample_rate(self) -> int:
        return self.decode_config.sample_rate

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far per stage (this rank, all workers)."""
        return {stage: counter.total for stage, counter in self.skip_counters.items()}

    # -- loaders ------------------------------------------------------------------------------

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    @property
    def _collate(self) -> Callable[[list[DecodedSample]], dict]:
        return partial(collate, sample_rate=self.sample_rate)

    def _decoder(self, train: bool) -> SampleDecoder:
        return SampleDecoder(self.decode_config, self.num_classes, self.multi_label, train=train)

    def train_dataloader(self):
        rank, world = self._rank_world()
        urls = self.index.shard_paths("train")
        num_samples = self.index.splits["train"].num_samples
        if num_samples < self.batch_size * world:
            raise ValueError(
                f"{num_samples} training samples cannot fill one batch of {self.batch_size} on each of "
                f"{world} ranks; lower data.batch_size"
            )
        batches = self.batches_per_epoch or num_samples // (self.batch_size * world)
        resampled = self.train_mode == "resampled"
        if not resampled and len(urls) < world:
            raise ValueError(
                f"train_mode='epoch' needs at least one shard per rank ({len(urls)} shards, {world} ranks); "
                f"use train_mode='resampled' or rewrite the shards with a smaller --max-samples"
            )
        skips = self.skip_counters["train"]
        dataset = (
            wds.WebDataset(
                urls,
                resampled=resampled,
                shardshuffle=False if resampled else len(urls),
                nodesplitter=partial(_split_by_rank, rank=rank, world=world),
                handler=skips,
                # A worker with no shard of its own (epoch mode, few shards) yields nothing; the
                # other workers and the repeat below still fill the epoch.
                empty_check=False,
            )
            .shuffle(self.shuffle_buffer)
            .map(self._decoder(train=True), handler=skips)
            .batched(self.batch_size, collation_fn=self._collate, partial=False)
        )
        # with_epoch repeats the stream as needed and cuts it at exactly `batches` batches, so every
        # rank runs the same number of steps whatever the shard sizes; the length is then exact.
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=self.num_workers)
        return loader.with_epoch(batches).with_length(batches, silent=True)

    def _eval_dataloader(self, stage: str):
        rank, world = self._rank_world()
        if stage not in self._eval_samples:
            self._eval_samples[stage] = [s for shard in self.index.shard_paths(stage) for s in index_tar(shard)]
        samples = self._eval_samples[stage]
        if len(samples) < world:
            # A rank without batches would never join the epoch-end metric collectives.
            raise ValueError(f"{len(samples)} {stage} samples cannot give each of {world} ranks at least one")
        stream = EvalStream(
            samples[rank::world],
            self._decoder(train=False),
            self._collate,
            self.batch_size,
            self.num_workers,
            self.skip_counters[stage],
        )
        # WebLoader + with_length rather than a DataLoader over a sized IterableDataset: same batches
        # and progress-bar total, without Lightning's warning that such lengths may be inaccurate.
        loader = wds.WebLoader(stream, batch_size=None, num_workers=self.num_workers)
        return loader.with_length(len(stream), silent=True)

    def val_dataloader(self):
        return self._eval_dataloader("val")

    def test_dataloader(self):
        return self._eval_dataloader("test")
