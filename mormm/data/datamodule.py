"""LightningDataModule over mormm shards (or a built-in demo).

Training streams shards (webdataset; see mormm.data.train_stream): shard and sample shuffling
seeded from (seed, epoch, rank, worker), and exactly `batches_per_epoch` batches on every rank, so
uneven shards can never leave one rank waiting in a collective. The data module's state (saved in
checkpoints by Lightning) is the position in the training stream, so `--ckpt_path` resumes an
epoch with exactly the batches it had left.

Evaluation reads samples by position (tar offsets from the shards' headers): rank r takes samples
r, r + world, ..., so across ranks every sample is seen exactly once, with no padding duplicates
and no streaming order to agree on.

Prediction reads either a split of the dataset (the evaluation stream) or the user's own media
files (a folder, searched recursively, or one file), decoded exactly like evaluation samples.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mormm.data.decode import DecodeConfig, DecodedSample, DecodeError, SampleDecoder, collate
from mormm.data.demo import DEMO_KINDS, ensure_demo
from mormm.data.index import DatasetIndex, TarSample, index_tar
from mormm.data.probe import MEDIA_EXTS, media_ext, probe_bytes
from mormm.data.skips import SkipCounter
from mormm.data.train_stream import POSITION_KEY, EpochPlan, TrainLoader, TrainStream

log = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"
SPLITS = ("train", "val", "test")
STAGES = (*SPLITS, "predict")


@dataclass
class TrainPosition:
    """This rank's position in the training stream: the epoch, the batches of it consumed so
    far, and per role (worker sub-stream) the raw samples those batches drew."""

    seed: int
    epoch: int
    batches: int
    drawn: list[int] = field(default_factory=list)


class Readable(Protocol):
    def read(self) -> dict: ...


@dataclass(frozen=True)
class MediaFile:
    """One media file given for prediction, read into the sample form the decoder expects:
    {"__key__", "__url__": path, "json": record, <ext>: bytes}, with no "cls" (no label)."""

    path: str
    key: str

    def read(self) -> dict[str, bytes | str]:
        ext = media_ext(self.path)
        try:
            data = Path(self.path).read_bytes()
            # The probe rejects broken files with a clear reason and gives the frame count that
            # video clip sampling needs (shards store it in the record when they are written).
            info = probe_bytes(data, ext)
        except Exception as exn:
            raise DecodeError(f"{self.path}: {type(exn).__name__}: {exn}") from exn
        record = {"key": self.key, "source": self.path, "media": {ext: info.to_json()}}
        return {"__key__": self.key, "__url__": self.path, "json": json.dumps(record).encode(), ext: data}


def _key_safe(relative: str) -> str:
    """A relative path as a sample key: no dots (webdataset splits key and extension at the first
    dot) and no path separators."""
    return re.sub(r"[./\\]", "_", relative)


def find_media_files(path: Path) -> list[MediaFile]:
    """The media files at `path` (a supported file, or a folder searched recursively; hidden files
    and folders are left out), sorted, with unique key-safe keys. Raises ValueError if there is
    none; files with other extensions are logged, not silently dropped."""
    exts = ", ".join(sorted(MEDIA_EXTS))
    if path.is_file():
        if media_ext(path) not in MEDIA_EXTS:
            raise ValueError(f"predict_from={str(path)!r}: unsupported extension '{path.suffix}' (supported: {exts})")
        found, root = [path], path.parent
    else:
        found, ignored, root = [], [], path
        for p in sorted(path.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts) or media_ext(p) not in MEDIA_EXTS:
                ignored.append(str(rel))
            else:
                found.append(p)
        if not found:
            raise ValueError(
                f"predict_from={str(path)!r}: no media files in folder {path} (searched recursively for: {exts}"
                f"{f'; {len(ignored)} other files ignored' if ignored else ''})"
            )
        if ignored:
            shown = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
            log.warning(
                "predict_from=%s: ignored %d files that are hidden or not media (supported: %s): %s",
                path, len(ignored), exts, shown,
            )
    files, used = [], set()
    for p in found:
        key = base = _key_safe(str(p.relative_to(root)))
        n = 1
        while key in used:  # e.g. a/b.wav and a_b.wav
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        files.append(MediaFile(str(p), key))
    return files


class EvalStream(IterableDataset):
    """This rank's evaluation samples (or prediction files), split over DataLoader workers,
    decoded and batched.

    Undecodable samples are skipped and counted; batches stay non-empty (a partial last batch per
    worker), so a skipped sample never produces an empty batch."""

    def __init__(
        self,
        samples: Sequence[Readable],
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

    def _worker_samples(self, worker: int) -> Sequence[Readable]:
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
        seed: seed of the training stream (shard draws, shuffle, crops); default the global seed
            (`seed_everything`, else torch's initial seed). A checkpoint keeps the seed it ran with.
        predict_from: what predict_dataloader reads: a split of the dataset ("train", "val" or
            "test"; None means "test"), streamed exactly once like evaluation; or the path of a
            media file or of a folder searched recursively for media files (audio: wav, flac, ogg,
            mp3, m4a; video: mp4, mkv, webm, avi; hidden files left out). A split name wins over a
            folder of the same name (write "./test" for the folder). Files are decoded like
            evaluation samples (centre crop, eval_views) and split over ranks and workers; each
            batch carries "key" (the relative path, made key-safe) and "meta" (with "source",
            the file's path); labels are -1 (multi-label: all zeros). Unreadable files are
            skipped, logged and counted in skipped["predict"].
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
        predict_from: str | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if dataset.startswith(DEMO_PREFIX):
            kind = dataset.removeprefix(DEMO_PREFIX)
            if kind not in DEMO_KINDS:
                raise ValueError(f"dataset={dataset!r}: demos are {', '.join(DEMO_PREFIX + k for k in DEMO_KINDS)}")
            dataset = str(ensure_demo(kind, cache_dir=cache_dir))
        self.index = DatasetIndex.load(dataset)
        missing_shards = self.index.missing_shards()
        if missing_shards:
            # Checked here: a resampled training stream would otherwise keep drawing the missing
            # shards and counting skips forever.
            shown = ", ".join(missing_shards[:5]) + (", ..." if len(missing_shards) > 5 else "")
            raise ValueError(
                f"{self.index.path} lists {len(missing_shards)} shard files that do not exist: {shown}; "
                f"rewrite the shards with `mormm shards INPUT {self.index.root} --overwrite`, or set data.dataset "
                f"to the folder that holds them"
            )
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
        self.seed = seed
        self._position: TrainPosition | None = None  # set when a training epoch starts
        self._resume: dict | None = None  # from load_state_dict, used by the next training epoch
        self.skip_counters = {stage: SkipCounter(stage, num_workers) for stage in STAGES}
        self._eval_samples: dict[str, list[TarSample]] = {}
        self.predict_from = predict_from or "test"
        self._predict_files: list[MediaFile] | None = None
        if self.predict_from not in SPLITS:
            path = Path(self.predict_from).expanduser()
            if not path.exists():
                raise ValueError(
                    f"predict_from={self.predict_from!r} is neither a split ({', '.join(SPLITS)}) nor an existing "
                    f"file or folder; give a split name, or the path of a media file or of a folder of media files"
                )
            self._predict_files = find_media_files(path)

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

    def _decoder(self, train: bool, allow_unlabelled: bool = False) -> SampleDecoder:
        return SampleDecoder(
            self.decode_config, self.num_classes, self.multi_label, train=train, allow_unlabelled=allow_unlabelled
        )

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
        # One role (sub-stream) per worker; in epoch mode no more roles than this rank has shards,
        # since a role without shards would run dry and change the workers' interleaving.
        rank_shards = len(urls[rank::world])
        roles = max(1, self.num_workers) if resampled else min(max(1, self.num_workers), rank_shards)
        stream = TrainStream(
            urls,
            resampled=resampled,
            rank=rank,
            world=world,
            roles=roles,
            decode=self._decoder(train=True),
            collate_fn=self._collate,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            skips=self.skip_counters["train"],
        )
        plan = partial(self._plan_epoch, batches=batches, roles=roles)
        return TrainLoader(stream, batches, num_workers=roles if self.num_workers else 0, plan_epoch=plan)

    # -- the training position: what a checkpoint keeps, and where the next epoch starts --------

    def _plan_epoch(self, batches: int, roles: int) -> EpochPlan:
        """Called as a training epoch starts: its seed, number and resume point."""
        rank, world = self._rank_world()
        resume, self._resume = self._resume, None
        if resume:
            seed, epoch, start, drawn = resume["seed"], resume["epoch"], resume["batches"], resume["drawn"]
            layout = resume["layout"]
        elif self._position is not None:
            seed, epoch, start, drawn, layout = self._position.seed, self._position.epoch + 1, 0, None, None
        else:
            seed = self.seed if self.seed is not None else torch.initial_seed()
            epoch, start, drawn, layout = 0, 0, None, None
        if start >= batches:  # saved at the end of its epoch
            epoch, start = epoch + 1, 0
        # Lightning decides which epoch runs (e.g. limit_train_batches ends one early); without a
        # trainer (or with a stand-in that has no epoch), epochs are counted here.
        current = getattr(self.trainer, "current_epoch", None)
        if current is not None and current != epoch:
            epoch, start = current, 0
        position = [0] * roles
        if start:
            if layout == [world, max(1, self.num_workers)] and drawn is not None:
                position = list(drawn[rank][:roles])
            else:
                log.warning(
                    "resuming epoch %d after %d batches: the checkpoint's data position was saved with %s ranks x "
                    "%s workers, this run has %d x %d; the rest of the epoch is drawn afresh (seeded), so some "
                    "samples may repeat",
                    epoch, start, *(layout or ["?", "?"]), world, max(1, self.num_workers),
                )
                drawn = None
        self._position = TrainPosition(seed, epoch, start, position)
        return EpochPlan(seed, epoch, start, tuple(position) if start and drawn is not None else ())

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Advances the training position by each batch handed to the training step (Lightning
        calls this for every batch it uses, after its prefetching), and drops the position key."""
        position = batch.pop(POSITION_KEY, None) if isinstance(batch, dict) else None
        if position is not None and self._position is not None and position["epoch"] == self._position.epoch:
            self._position.batches += 1
            self._position.drawn[position["role"]] = position["drawn"]
        return batch

    def state_dict(self) -> dict:
        """The training position, which Lightning saves in checkpoints: seed, epoch, batches consumed
        in it, and every rank's raw samples drawn per worker (gathered: only rank 0's dict is saved,
        and every rank's stream is different)."""
        if self._position is None:
            return dict(self._resume or {})
        p = self._position
        _, world = self._rank_world()
        width = max(1, self.num_workers)
        drawn = torch.tensor(p.drawn + [0] * (width - len(p.drawn)))
        if world > 1:  # checkpoints are written by all ranks together, so a collective is safe here
            strategy = self.trainer.strategy
            drawn = strategy.all_gather(drawn.to(strategy.root_device)).cpu()  # (world, width)
        return {
            "seed": p.seed,
            "epoch": p.epoch,
            "batches": p.batches,
            "drawn": drawn.reshape(world, width).tolist(),
            "layout": [world, width],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the training position saved by state_dict; the next training epoch resumes there."""
        self._resume = dict(state_dict) if state_dict else None

    def _split_samples(self, split: str) -> list[TarSample]:
        if split not in self._eval_samples:
            self._eval_samples[split] = [s for shard in self.index.shard_paths(split) for s in index_tar(shard)]
        return self._eval_samples[split]

    def _eval_dataloader(self, stage: str):
        rank, world = self._rank_world()
        samples = self._split_samples(stage)
        if len(samples) < world:
            # A rank without batches would never join the epoch-end metric collectives.
            raise ValueError(f"{len(samples)} {stage} samples cannot give each of {world} ranks at least one")
        return self._stream_loader(samples[rank::world], self._decoder(train=False), stage)

    def _stream_loader(self, samples: Sequence[Readable], decoder: SampleDecoder, stage: str):
        stream = EvalStream(
            samples, decoder, self._collate, self.batch_size, self.num_workers, self.skip_counters[stage]
        )
        # WebLoader + with_length rather than a DataLoader over a sized IterableDataset: same batches
        # and progress-bar total, without Lightning's warning that such lengths may be inaccurate.
        loader = wds.WebLoader(stream, batch_size=None, num_workers=self.num_workers)
        return loader.with_length(len(stream), silent=True)

    def val_dataloader(self):
        return self._eval_dataloader("val")

    def test_dataloader(self):
        return self._eval_dataloader("test")

    def predict_dataloader(self):
        """Batches of `predict_from` (see the class docstring), each sample once across ranks.

        Prediction has no epoch-end collectives, so a rank may get no samples (fewer files than
        ranks); it then yields no batch."""
        rank, world = self._rank_world()
        items: Sequence[Readable]
        if self._predict_files is None:
            items = self._split_samples(self.predict_from)
        else:
            items = self._predict_files
        return self._stream_loader(items[rank::world], self._decoder(train=False, allow_unlabelled=True), "predict")
