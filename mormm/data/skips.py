"""Counting skipped samples across DataLoader worker processes, and logging the counts per epoch.

Decoding runs in worker processes, so a plain Python counter there would die with the worker. The
counts live in a small shared-memory tensor instead (one slot per worker, so workers never write
the same slot and need no lock); the main process reads the sum whenever it likes. Each slot also
keeps its first reason, so an error about skipped samples can say why. The reason for
each skip is logged from the worker as it happens (Python logging, WARNING level), so every
dropped sample is both counted and named.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

REASON_BYTES = 300  # per worker: the first skip reason, UTF-8, cut to this length


class SkipCounter:
    """A webdataset exception handler that counts and logs the exception, then continues."""

    def __init__(self, stage: str, num_workers: int):
        self.stage = stage
        self.counts = torch.zeros(num_workers + 1, dtype=torch.int64).share_memory_()  # slot 0: main process
        self.reasons = torch.zeros(num_workers + 1, REASON_BYTES, dtype=torch.uint8).share_memory_()

    def __call__(self, exn: Exception) -> bool:
        worker = get_worker_info()
        slot = 0 if worker is None else worker.id + 1
        self.counts[slot] += 1
        reason = f"{type(exn).__name__}: {exn}"
        if self.counts[slot] == 1:
            data = reason.encode()[:REASON_BYTES]
            self.reasons[slot, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        log.warning("skipped a %s sample: %s", self.stage, reason)
        return True  # webdataset: go on with the next sample

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def first_reason(self) -> str | None:
        """The reason of the first skip seen by the lowest-numbered process that skipped any."""
        for slot in range(len(self.counts)):
            if self.counts[slot]:
                return bytes(self.reasons[slot].tolist()).rstrip(b"\0").decode(errors="replace")
        return None


class LogSkippedSamples(L.Callback):
    """Logs `data/skipped_<stage>` (samples skipped this epoch, summed over ranks) at every epoch
    end, for a DataModule with a `skipped` mapping of stage -> running count. Prediction, where
    Lightning allows no self.log, gets a warning with the count instead."""

    def __init__(self):
        self._seen: dict[str, int] = {}

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is None:
            return
        new = skipped[stage] - self._seen.get(stage, 0)
        self._seen[stage] = skipped[stage]
        if new:
            log.warning("rank %d: %d %s samples skipped this epoch", trainer.global_rank, new, stage)
        pl_module.log(f"data/skipped_{stage}", float(new), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self, trainer, pl_module):
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._log(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer, pl_module):
        # Lightning forbids self.log in prediction: the count is only written to the Python log
        # (each file's reason was logged when it was skipped).
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is None or "predict" not in skipped:
            return
        new = skipped["predict"] - self._seen.get("predict", 0)
        self._seen["predict"] = skipped["predict"]
        if new:
            log.warning("rank %d: %d predict samples skipped (not in the predictions)", trainer.global_rank, new)
