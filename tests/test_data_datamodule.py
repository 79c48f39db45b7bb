"""ShardDataModule: equal train batches per rank, exact-once evaluation, skip counting, demos,
and a real two-process CPU DDP run under Lightning."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from mormm.data import ShardDataModule, ensure_demo
from mormm.data.demo import CLASSES, cache_root
from mormm.data.index import DatasetIndex
from mormm.data.shards import write_shards


def make_audio_dataset(root: Path, per_class: int = 9, max_samples: int = 4) -> Path:
    """Two classes of short wavs (lengths vary), split 2/3 train, 1/3 val, in uneven shards."""
    rng = np.random.default_rng(0)
    for name in ["low", "high"]:
        for i in range(per_class):
            (root / "in" / name).mkdir(parents=True, exist_ok=True)
            wave = rng.uniform(-0.3, 0.3, 1600 + 160 * i).astype(np.float32)
            sf.write(root / "in" / name / f"{i}.wav", wave, 8_000)
    return write_shards(root / "in", root / "shards", split=[2 / 3, 1 / 3], max_samples=max_samples).output


def corrupt(shards: Path, split: str, count: int) -> list[str]:
    """Replace the audio bytes of the first `count` samples of the split's first shard with garbage
    (json and cls stay valid: only decoding can notice). Returns the corrupted keys."""
    index = DatasetIndex.load(shards)
    path = shards / index.splits[split].shards[0].path
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})[:count]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name.split(".")[0] in keys and m.name.endswith(".wav"):
                data = b"RIFF" + bytes(len(data) - 4)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return keys


def as_rank(dm: ShardDataModule, rank: int, world: int) -> ShardDataModule:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_audio_dataset(tmp_path_factory.mktemp("data"))


def test_class_names_and_count_come_from_the_index(shards: Path):
    dm = ShardDataModule(str(shards), batch_size=2, num_workers=0)
    assert dm.class_names == ["high", "low"] and dm.num_classes == 2 and dm.modalities == ["audio"]
    with pytest.raises(ValueError, match=r"modalities \['video'\] are not in every sample"):
        ShardDataModule(str(shards), modalities=["video"])
    with pytest.raises(FileNotFoundError, match="mormm shards"):
        ShardDataModule(str(shards / "nowhere"))


def test_missing_shard_files_are_named_at_construction(tmp_path: Path):
    shards = make_audio_dataset(tmp_path)
    gone = shards / DatasetIndex.load(shards).splits["train"].shards[1].path
    gone.unlink()
    with pytest.raises(ValueError) as info:
        ShardDataModule(str(shards), num_workers=0)
    message = str(info.value)
    assert str(gone) in message and str(shards / "index.json") in message
    assert "mormm shards" in message and "data.dataset" in message


def test_a_val_shard_that_is_not_a_tar_is_a_clear_error(tmp_path: Path):
    shards = make_audio_dataset(tmp_path)
    bad = shards / DatasetIndex.load(shards).splits["val"].shards[0].path
    bad.write_bytes(b"this is not a tar file" * 100)
    dm = ShardDataModule(str(shards), batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=rf"shard {bad} is corrupt or not a tar file.*rewrite it with `mormm shards`"):
        dm.val_dataloader()


@pytest.mark.parametrize("train_mode", ["resampled", "epoch"])
def test_training_on_shards_that_are_all_unreadable_stops_with_an_error(tmp_path: Path, train_mode: str):
    shards = make_audio_dataset(tmp_path)
    for shard in DatasetIndex.load(shards).splits["train"].shards:
        (shards / shard.path).write_bytes(b"this is not a tar file" * 100)
    dm = ShardDataModule(str(shards), batch_size=2, num_workers=0, train_mode=train_mode)
    with pytest.raises(ValueError, match="no readable sample in 30 training shard draws in a row"):
        next(iter(dm.train_dataloader()))  # instead of drawing forever
    assert dm.skipped["train"] == 30


@pytest.mark.parametrize("train_mode", ["resampled", "epoch"])
def test_every_rank_gets_the_same_number_of_full_train_batches(shards: Path, train_mode: str):
    # 12 train samples in shards of 4, 4, 4: ranks see uneven data, yet must step in lockstep.
    counts = []
    for rank in range(2):
        dm = as_rank(ShardDataModule(str(shards), batch_size=2, num_workers=2, train_mode=train_mode), rank, 2)
        loader = dm.train_dataloader()
        batches = list(loader)
        counts.append(len(batches))
        assert len(loader) == len(batches) == 12 // (2 * 2)
        assert all(b["audio"].shape[0] == 2 and b["audio_lengths"].max() == b["audio"].shape[1] for b in batches)
        assert all(b["audio"].shape[1] <= 16_000 * 0.4 and b["sample_rate"] == 16_000 for b in batches)
        assert len(list(loader)) == counts[-1]  # and again next epoch
    assert counts == [3, 3]


def test_epoch_mode_needs_a_shard_per_rank(shards: Path):
    dm = as_rank(ShardDataModule(str(shards), batch_size=1, num_workers=0, train_mode="epoch"), 0, 4)
    with pytest.raises(ValueError, match="at least one shard per rank"):
        dm.train_dataloader()


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (4, 2), (6, 1)])
def test_evaluation_sees_every_sample_exactly_once_across_ranks(shards: Path, world: int, workers: int):
    seen = []
    for rank in range(world):
        dm = as_rank(ShardDataModule(str(shards), batch_size=2, num_workers=workers), rank, world)
        loader = dm.val_dataloader()
        keys = [k for batch in loader for k in batch["key"]]
        assert keys, f"rank {rank} got no validation batch"
        assert len(loader) == sum(1 for _ in loader)
        seen += keys
    assert sorted(seen) == [f"val_{i:07d}" for i in range(6)]
    too_many = as_rank(ShardDataModule(str(shards), num_workers=0), 0, 7)
    with pytest.raises(ValueError, match="6 val samples cannot give each of 7 ranks"):
        too_many.val_dataloader()


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path, workers: int, caplog):
    shards = make_audio_dataset(tmp_path)
    bad_val = corrupt(shards, "val", 2)
    bad_train = corrupt(shards, "train", 4)  # the whole first train shard
    dm = ShardDataModule(str(shards), batch_size=2, num_workers=workers)

    keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert sorted(keys + bad_val) == [f"val_{i:07d}" for i in range(6)]
    assert dm.skipped["val"] == 2

    train_keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert len(train_keys) == 12 and not set(train_keys) & set(bad_train)  # still full batches
    assert dm.skipped["train"] >= 1 and dm.skipped["test"] == 0
    if workers == 0:  # worker processes log to their own stderr, not to caplog
        assert any(
            k in r.getMessage() and "skipped a val sample" in r.getMessage() for r in caplog.records for k in bad_val
        )


def test_demo_is_deterministic_annotated_and_cached(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MORMM_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" / "demo"
    first = ensure_demo("audio_video", samples_per_class=5, seed=3)
    assert first.parent == tmp_path / "env" / "demo"
    again = ensure_demo("audio_video", cache_dir=tmp_path / "arg", samples_per_class=5, seed=3)
    assert again.parent == tmp_path / "arg" / "demo"
    assert ensure_demo("audio_video", samples_per_class=5, seed=3) == first  # cached

    def samples(folder):
        return {
            key: (wav, mp4, json.loads(js))
            for shard in sorted(folder.glob("*.tar"))
            for key, wav, mp4, js in _members(shard)
        }

    a, b = samples(first), samples(again)
    assert a.keys() == b.keys() and len(a) == 20
    assert all(a[k][0] == b[k][0] and a[k][1] == b[k][1] and a[k][2] == b[k][2] for k in a)

    dm = ShardDataModule(str(first), batch_size=4, num_workers=0, num_frames=16, frame_stride=1)
    assert dm.class_names == sorted(CLASSES) and dm.modalities == ["audio", "video"]
    batch = next(iter(dm.val_dataloader()))
    for i, meta in enumerate(batch["meta"]):
        event = meta["event"]
        # Audio: the event is far louder than the background around it.
        a0, a1 = int(event["start_s"] * 16_000), int(event["end_s"] * 16_000)
        wave = batch["audio"][i]
        inside = wave[a0:a1].pow(2).mean()
        outside = torch.cat([wave[:a0], wave[a1:]]).pow(2).mean()
        assert inside > 20 * outside
        # Video: the annotated box holds the object, whose pixels change while the background does not.
        assert event["frames"] == [t for t, box in enumerate(event["boxes"]) if box is not None]
        assert event["frames"][0] == round(event["start_s"] * 16)
        video = batch["video"][i]  # (T, C, H, W), 32x32 demo frames: eval crop is the identity
        background = video[0]
        for t in event["frames"]:
            x0, y0, x1, y1 = event["boxes"][t]
            diff = (video[t] - background).abs().amax(dim=0)  # (H, W)
            assert diff[y0:y1, x0:x1].max() > 0.3
            outside = diff.clone()
            outside[y0:y1, x0:x1] = 0
            assert outside.max() < 0.3


def _members(shard: Path):
    with tarfile.open(shard) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in sorted({name.split(".")[0] for name in files}):
        yield key, files[f"{key}.wav"], files[f"{key}.mp4"], files[f"{key}.json"]


def test_demo_names_are_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="demo:audio, demo:video, demo:audio_video"):
        ShardDataModule("demo:speech", cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Two-process CPU DDP (gloo). Lightning's "ddp" strategy re-runs the launching script for rank 1,
# so the run lives in a small standalone script that writes per-rank results as JSON.

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from mormm.data import LogSkippedSamples, ShardDataModule

    shards, out = sys.argv[1], sys.argv[2]

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_batches, self.val_keys = [], []

        def on_train_epoch_start(self):
            self.train_batches.append(0)

        def training_step(self, batch, i):
            self.train_batches[-1] += 1
            return (self.w * batch["audio"].mean()).sum()

        def on_validation_epoch_start(self):
            self.val_keys.append([])

        def validation_step(self, batch, i):
            self.val_keys[-1] += batch["key"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_fit_end(self):
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
            result = dict(train_batches=self.train_batches, val_keys=self.val_keys, metrics=metrics,
                          skipped=self.trainer.datamodule.skipped)
            with open(f"{out}/rank{self.global_rank}.json", "w") as f:
                json.dump(result, f)

    dm = ShardDataModule(shards, batch_size=2, num_workers=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LogSkippedSamples()])
    trainer.fit(Probe(), datamodule=dm)
    """
)


def test_two_rank_ddp_equal_train_steps_and_exact_once_validation(tmp_path: Path):
    # 14 train samples in shards of 5, 5, 4; 6 val samples in shards of 5 and 1, one corrupt.
    shards = make_audio_dataset(tmp_path, per_class=10, max_samples=5)
    bad = corrupt(shards, "val", 1)
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, str(script), str(shards), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # 14 train samples // (2 per batch x 2 ranks) = 3 steps, on both ranks, in both epochs.
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] == [3, 3]
    all_val = [f"val_{i:07d}" for i in range(6)]
    for epoch in range(2):
        seen = ranks[0]["val_keys"][epoch] + ranks[1]["val_keys"][epoch]
        assert len(seen) == len(set(seen)), "a validation sample was seen twice"
        assert sorted(seen + bad) == all_val
    assert ranks[0]["skipped"]["val"] + ranks[1]["skipped"]["val"] == 2  # once per epoch
    assert ranks[0]["metrics"]["data/skipped_val"] == 1.0  # summed over ranks, last epoch
    assert ranks[0]["metrics"]["data/skipped_train"] == 0.0
