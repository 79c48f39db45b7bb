"""Writes `mormm predict` results: one JSON line per clip with its class, probability and depths."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """One JSON line per clip: key, source, predicted class and probability, the top-5, and the
    depth (recursions) of every content token in sequence order (padding and a class token left
    out: Tokens.content, the tokens the depth analysis counts too).

    Predictions go to the file batch by batch and nowhere else: the writer turns off Lightning's
    in-memory list of every prediction (so `trainer.predict` returns None). A run in which every
    input was skipped (unreadable files) is an error (ValueError), not an empty file.

    output: file to write; default `<trainer log dir>/predictions.jsonl`. Each rank of a
            distributed run writes its own `.rank<N>` file next to it.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._path: Path | None = None
        self._written = 0
        self._skipped_before = 0

    def _file(self, trainer: L.Trainer) -> Path:
        if self._path is None:
            root = Path(trainer.log_dir or trainer.default_root_dir)
            path = Path(self.output) if self.output else root / "predictions.jsonl"
            if trainer.world_size > 1:
                path = path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
            self._path = path
        return self._path

    def on_predict_start(self, trainer, pl_module) -> None:
        trainer.predict_loop.return_predictions = False
        self._written = 0
        self._skipped_before = _skips(trainer)[0]

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        # model.depthwise: the batches still in the pipeline when the data ran out
        for prediction in getattr(pl_module, "flush_predictions", list)():
            self._write(trainer, prediction)
        if self._path is not None:
            print(f"predictions written to {self._path}")
        self._path = None
        skipped, reason = _skips(trainer)
        counts = torch.tensor([self._written, skipped - self._skipped_before], device=pl_module.device)
        written, skipped = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        if written == 0 and skipped > 0:
            raise ValueError(
                f"no predictions written: all {skipped} inputs were skipped as unreadable (first reason: {reason}; "
                f"every file's reason is in the log above)"
            )

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if prediction is not None:  # None: a depth-wise pipeline still filling (model.depthwise)
            self._write(trainer, prediction)

    def _write(self, trainer: L.Trainer, prediction: dict) -> None:
        names = list(getattr(trainer.datamodule, "class_names", []) or [])
        probs = prediction["probs"].float().cpu()
        depth = prediction["depth"].cpu()
        keep = prediction["content"].cpu()
        views = prediction.get("clip_index")
        views = torch.arange(len(probs)) if views is None else views.cpu()
        keys = prediction.get("key") or [str(i) for i in range(len(probs))]
        metas = prediction.get("meta") or [{} for _ in keys]
        with self._file(trainer).open("a") as f:
            for i, (key, meta) in enumerate(zip(keys, metas)):
                top = probs[i].topk(min(5, probs.shape[-1]))
                rows = (views == i).nonzero().flatten().tolist()  # this clip's views
                token_depths = [depth[r][keep[r]].tolist() for r in rows]
                record = {
                    "key": key,
                    "source": (meta or {}).get("source"),
                    "class": _name(names, int(top.indices[0])),
                    "probability": round(float(top.values[0]), 6),
                    "top5": [[_name(names, int(c)), round(float(p), 6)]
                             for p, c in zip(top.values, top.indices)],
                    "mean_depth": round(sum(map(sum, token_depths)) / max(1, sum(map(len, token_depths))), 4),
                    "depth": token_depths[0] if len(token_depths) == 1 else token_depths,
                }
                f.write(json.dumps(record) + "\n")
                self._written += 1


def _skips(trainer: L.Trainer) -> tuple[int, str | None]:
    """Prediction inputs skipped so far on this rank, and the first reason (ShardDataModule)."""
    dm = trainer.datamodule
    counter = getattr(dm, "skip_counters", {}).get("predict")
    return (0, None) if counter is None else (counter.total, counter.first_reason)


def _name(names: list[str], i: int) -> str | int:
    return names[i] if i < len(names) else i
