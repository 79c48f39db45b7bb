"""The training stream: seeded, resumable, and exactly `batches` batches per epoch on every rank.

A rank's epoch is R interleaved sub-streams ("roles", R = its DataLoader workers): the DataLoader
takes one batch from each worker in turn, so batch g of the epoch is the (g // R)-th batch of role
g % R. Each role is an endless stream cut at `batches` batches by TrainLoader, so no role ever runs
dry and the interleaving never changes: "resampled" draws from all shards with replacement;
"epoch" deals the shards (in a new order every epoch, the same on every rank) to ranks, then to
roles, and a role goes through its own shards in a new order every pass.

Everything random in a role (shard draws, the shuffle buffer, each sample's clip position and
crop) is seeded from (seed, epoch, rank, role), so the batches of an epoch are a function of
those alone.

Resuming mid-epoch: each batch carries its position (POSITION_KEY: epoch, role, and how many raw
samples the role had drawn once the batch was full). After g consumed batches, the next batch is
role g % R's, so the resumed DataLoader's worker w plays role (w + g) % R, and each role replays
its raw stream (reading tar members and shuffling, but decoding nothing) up to the samples it had
drawn. Raw counts, not batch counts, because a sample that fails to decode is skipped and its
replacement still belongs to the batch.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mormm.data.skips import SkipCounter

# Batch key of a training batch's stream position; ShardDataModule.on_before_batch_transfer
# removes it, so the model never sees it.
POSITION_KEY = "_stream_position"
# A role that draws this many shards per shard it has in a row, all without a readable sample,
# stops with an error instead of drawing forever.
MAX_EMPTY_DRAWS_PER_SHARD = 10


@dataclass(frozen=True)
class EpochPlan:
    """Where one rank's training epoch starts."""

    seed: int
    epoch: int
    start: int = 0  # batches of the epoch already consumed (resume)
    drawn: tuple[int, ...] = ()  # per role: raw samples drawn by the consumed batches; () = none


class TrainStream(IterableDataset):
    """One rank's training batches for the epoch in `plan`, split into `roles` sub-streams (one per
    DataLoader worker). Decode failures are skipped and counted; batches are always full."""

    def __init__(
        self,
        shards: list[str],
        resampled: bool,
        rank: int,
        world: int,
        roles: int,
        decode: Callable,
        collate_fn: Callable,
        batch_size: int,
        shuffle_buffer: int,
        skips: SkipCounter,
    ):
        self.shards = shards
        self.resampled = resampled
        self.rank = rank
        self.world = world
        self.roles = roles
        self.decode = decode
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.skips = skips
        self.plan = EpochPlan(seed=0, epoch=0)

    def role_shards(self, role: int) -> list[str]:
        if self.resampled:
            return self.shards
        order = list(self.shards)
        random.Random(f"mormm-shards/{self.plan.seed}/{self.plan.epoch}").shuffle(order)
        return order[self.rank :: self.world][role :: self.roles]

    def _shard_order(self, shards: list[str], rng: random.Random) -> Iterator[str]:
        if self.resampled:
            while True:
                yield rng.choice(shards)
        while True:  # epoch mode: every shard once per pass, repeated until the epoch is cut
            order = list(shards)
            rng.shuffle(order)
            yield from order

    def raw_samples(self, role: int, rng: random.Random) -> Iterator[dict]:
        """The role's undecoded samples, shuffled, endless."""
        shards = self.role_shards(role)
        empty = 0
        for url in self._shard_order(shards, rng):
            found = False
            for sample in wds.tarfile_samples([{"url": url}], handler=self.skips):
                found = True
                yield sample
            empty = 0 if found else empty + 1
            if empty >= MAX_EMPTY_DRAWS_PER_SHARD * len(shards):
                raise ValueError(
                    f"no readable sample in {empty} training shard draws in a row (shards: {', '.join(shards[:3])}"
                    f"{', ...' if len(shards) > 3 else ''}); rewrite the shards with `mormm shards`"
                )

    def __iter__(self):
        plan = self.plan
        info = get_worker_info()
        role = ((0 if info is None else info.id) + plan.start) % self.roles
        name = f"mormm-train/{plan.seed}/{plan.epoch}/{self.rank}/{role}"
        rng = random.Random(name)
        shuffled = wds.shuffle(self.shuffle_buffer, rng=rng)(self.raw_samples(role, rng))
        drawn = plan.drawn[role] if plan.drawn else 0
        batch = []
        for i, sample in enumerate(islice(shuffled, drawn, None), start=drawn):
            try:
                # One generator per sample: augmentation does not depend on which samples before
                # it were decoded (none are, when resuming).
                batch.append(self.decode(sample, random.Random(f"{name}/{i}")))
            except Exception as exn:
                self.skips(exn)
                continue
            if len(batch) == self.batch_size:
                out = self.collate_fn(batch)
                out[POSITION_KEY] = {"epoch": plan.epoch, "role": role, "drawn": i + 1}
                yield out
                batch = []


class TrainLoader:
    """Iterating gives one training epoch: exactly `batches` batches, less those a resumed epoch
    had already consumed. `plan_epoch` (the data module) says which epoch and where it starts.

    It has `state_dict` / `load_state_dict` only so that Lightning knows it resumes mid-epoch (and
    does not warn otherwise); the position itself is the data module's state (see there)."""

    def __init__(self, stream: TrainStream, batches: int, num_workers: int, plan_epoch: Callable[[], EpochPlan]):
        self.stream = stream
        self.batches = batches
        self.num_workers = num_workers
        self.plan_epoch = plan_epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        stream = copy.copy(self.stream)  # DataLoader workers get it as it is when they start
        stream.plan = self.plan_epoch()
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers)
        yield from islice(loader, self.batches - stream.plan.start)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

