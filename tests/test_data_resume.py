"""The training stream is reproducible and resumable: the same seed gives the same batches, and a
data module restored from a mid-epoch state gives exactly the batches the original had left, also
under Lightning (--ckpt_path) on one and on two DDP ranks."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mormm.data import ShardDataModule
from mormm.data.train_stream import POSITION_KEY
from test_data_datamodule import corrupt, make_audio_dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """18 train samples in shards of 4, 4, 4, 4, 2 (one of them undecodable), 9 val."""
    shards = make_audio_dataset(tmp_path_factory.mktemp("data"), per_class=14, max_samples=4)
    corrupt(shards, "train", 1)
    return shards


def data(shards: Path, rank: int = 0, world: int = 1, **kw) -> ShardDataModule:
    args = dict(batch_size=2, num_workers=2, clip_seconds=0.1, batches_per_epoch=6, shuffle_buffer=8, seed=7)
    dm = ShardDataModule(str(shards), **{**args, **kw})
    if world > 1:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


def fingerprint(batch: dict) -> tuple:
    """What identifies a training batch: its clips and their random crops."""
    return tuple(batch["key"]), round(float(batch["audio"].abs().sum()), 4)


def consume(dm: ShardDataModule, iterator, count: int) -> list[tuple]:
    """Take `count` batches as Lightning does: each goes through on_before_batch_transfer."""
    return [fingerprint(dm.on_before_batch_transfer(next(iterator), 0)) for _ in range(count)]


@pytest.mark.parametrize("train_mode, workers", [("resampled", 0), ("resampled", 2), ("epoch", 3)])
def test_the_same_seed_gives_the_same_batches(shards: Path, train_mode: str, workers: int):
    runs = []
    for seed in (7, 7, 8):
        loader = data(shards, seed=seed, num_workers=workers, train_mode=train_mode).train_dataloader()
        runs.append([[fingerprint(b) for b in loader] for _epoch in range(2)])
    assert runs[0] == runs[1]
    first, second = runs[0]
    assert len(first) == len(second) == 6 and first != second  # each epoch has its own order
    assert runs[2] != runs[0]
    torch.manual_seed(11)  # no seed argument: the global seed (seed_everything) decides
    a = [fingerprint(b) for b in data(shards, seed=None).train_dataloader()]
    torch.manual_seed(11)
    assert a == [fingerprint(b) for b in data(shards, seed=None).train_dataloader()]


@pytest.mark.parametrize("train_mode, workers", [("resampled", 0), ("resampled", 2), ("epoch", 2), ("resampled", 3)])
@pytest.mark.parametrize("consumed", [0, 3, 6])
def test_a_restored_module_yields_exactly_the_batches_the_original_had_left(
    shards: Path, train_mode: str, workers: int, consumed: int
):
    dm = data(shards, num_workers=workers, train_mode=train_mode)
    loader = dm.train_dataloader()
    consume(dm, iter(loader), 6)  # epoch 0
    epoch1 = iter(loader)
    consume(dm, epoch1, consumed)
    state = dm.state_dict()
    assert (state["epoch"], state["batches"]) == ((1, consumed) if consumed else (0, 6))
    rest = [fingerprint(b) for b in epoch1]
    assert len(rest) == 6 - consumed
    epoch2 = [fingerprint(b) for b in loader]

    restored = data(shards, num_workers=workers, train_mode=train_mode, seed=123)  # the checkpoint's seed wins
    restored.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    again = restored.train_dataloader()
    assert len(again) == 6
    assert [fingerprint(b) for b in again] == (rest or epoch2)
    if rest:
        assert [fingerprint(b) for b in again] == epoch2


def test_position_is_counted_from_batches_handed_to_the_model(shards: Path):
    dm = data(shards, num_workers=0)
    assert dm.state_dict() == {}  # nothing trained yet: nothing to save
    batches = iter(dm.train_dataloader())
    batch = next(batches)
    assert POSITION_KEY in batch
    assert POSITION_KEY not in dm.on_before_batch_transfer(batch, 0)  # the model never sees it
    next(batches)  # fetched but not used: not consumed
    assert dm.state_dict()["batches"] == 1


def test_a_different_layout_resumes_with_the_right_number_of_batches(shards: Path, caplog):
    dm = data(shards, num_workers=2)
    batches = iter(dm.train_dataloader())
    consume(dm, batches, 4)
    restored = data(shards, num_workers=3)
    restored.load_state_dict(dm.state_dict())
    assert len(list(restored.train_dataloader())) == 2
    assert "saved with 1 ranks x 2 workers, this run has 1 x 3" in caplog.text


def test_two_ranks_resume_each_from_its_own_position(shards: Path):
    """state_dict gathers every rank's position (Lightning saves rank 0's dict only)."""
    ranks = [data(shards, rank=r, world=2, batches_per_epoch=4) for r in range(2)]
    iterators = [iter(dm.train_dataloader()) for dm in ranks]
    for dm, it in zip(ranks, iterators, strict=True):
        consume(dm, it, 3)
    rest = [[fingerprint(b) for b in it] for it in iterators]

    drawn = [torch.tensor(dm._position.drawn) for dm in ranks]
    gather = lambda t: torch.stack(drawn)  # noqa: E731  what all_gather returns on every rank
    for dm in ranks:
        dm.trainer.strategy = SimpleNamespace(all_gather=gather, root_device=torch.device("cpu"))
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() and state["layout"] == [2, 2]
    for rank in range(2):
        restored = data(shards, rank=rank, world=2, batches_per_epoch=4)
        restored.load_state_dict(state)
        assert [fingerprint(b) for b in restored.train_dataloader()] == rest[rank]


# ---------------------------------------------------------------------------------------------
# Under Lightning: fit 2 epochs with a checkpoint mid-way through the second, then resume from it
# in a fresh process. The resumed run must train on exactly the batches the first run had after
# the checkpoint, on every rank.

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from mormm.data import ShardDataModule

    shards, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.steps = []

        def training_step(self, batch, i):
            self.steps.append([self.current_epoch, i, batch["key"], round(float(batch["audio"].abs().sum()), 4)])
            return (self.w * batch["audio"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_fit_end(self):
            with open(f"{out}/rank{self.global_rank}.json", "w") as f:
                json.dump(self.steps, f)

    L.seed_everything(3)
    dm = ShardDataModule(shards, batch_size=2, num_workers=2, clip_seconds=0.1, batches_per_epoch=4, shuffle_buffer=8)
    checkpoint = ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=6, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
                        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoint])
    trainer.fit(Probe(), datamodule=dm, ckpt_path=ckpt)
    """
)


@pytest.mark.parametrize("devices", [1, 2])
def test_fit_resumed_from_a_mid_epoch_checkpoint_trains_on_the_same_batches(shards: Path, tmp_path: Path, devices):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def run(out: Path, *ckpt: str) -> list[list]:
        out.mkdir()
        args = [sys.executable, str(script), str(shards), str(out), str(devices), *ckpt]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "not resumable" not in proc.stderr
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", str(tmp_path / "full" / "step=6.ckpt"))
    for rank in range(devices):
        assert [s[:2] for s in full[rank]] == [[e, i] for e in range(2) for i in range(4)]
        assert resumed[rank] == full[rank][6:]  # epoch 1, batches 2 and 3: same clips, same crops
    if devices == 2:
        assert full[0] != full[1]  # ranks train on different batches
