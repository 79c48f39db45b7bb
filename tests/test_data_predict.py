"""ShardDataModule.predict_dataloader: a dataset split, or the user's own media files."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from mormm.data import ShardDataModule
from mormm.data.demo import write_mp4
from mormm.data.shards import write_shards


def write_wav(path: Path, seconds: float = 0.1, rate: int = 8_000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * rate)).astype(np.float32)
    sf.write(path, wave, rate, subtype="PCM_16")
    return path


def as_rank(dm: ShardDataModule, rank: int, world: int) -> ShardDataModule:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two classes x 6 wavs, split 1/2 train, 1/4 val, 1/4 test, in shards of 2."""
    root = tmp_path_factory.mktemp("data")
    for c, name in enumerate(["low", "high"]):
        for i in range(6):
            write_wav(root / "in" / name / f"{i}.wav", seconds=0.05 + 0.01 * i, seed=10 * c + i)
    return write_shards(root / "in", root / "shards", split=[0.5, 0.25, 0.25], max_samples=2).output


@pytest.fixture
def media_folder(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    for i, rel in enumerate(["a.wav", "b.wav", "sub/c.wav", "sub/deeper/d.WAV", "e.flac"]):
        write_wav(root / rel, seed=i)
    (root / "sub" / "broken.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    (root / "notes.txt").write_text("not media")
    (root / ".hidden.wav").write_bytes(b"")
    return root


GOOD = {"a_wav": "a.wav", "b_wav": "b.wav", "sub_c_wav": "sub/c.wav", "sub_deeper_d_WAV": "sub/deeper/d.WAV"}
GOOD["e_flac"] = "e.flac"


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_folder_batches_cover_every_good_file_once_and_count_the_corrupt_one(
    shards: Path, media_folder: Path, world: int, workers: int, caplog
):
    seen, skipped = {}, 0
    with caplog.at_level(logging.WARNING):
        for rank in range(world):
            dm = as_rank(
                ShardDataModule(str(shards), batch_size=2, num_workers=workers, predict_from=str(media_folder)),
                rank,
                world,
            )
            for batch in dm.predict_dataloader():
                assert batch["audio"].shape[0] == len(batch["key"]) == len(batch["meta"]) <= 2
                assert torch.equal(batch["label"], torch.full((len(batch["key"]),), -1))
                for key, meta in zip(batch["key"], batch["meta"], strict=True):
                    assert key not in seen
                    seen[key] = meta["source"]
            skipped += dm.skipped["predict"]
    assert seen == {k: str(media_folder / rel) for k, rel in GOOD.items()}
    assert skipped == 1
    if workers == 0:  # worker processes log to their own stderr, not to caplog
        messages = [r.getMessage() for r in caplog.records]
        assert any("sub/broken.wav" in m and "skipped a predict sample" in m for m in messages)
    assert any("notes.txt" in r.getMessage() for r in caplog.records)  # ignored files are reported too


def test_single_file_and_multi_label_targets(tmp_path: Path, shards: Path):
    path = write_wav(tmp_path / "one.clip.wav")
    dm = ShardDataModule(str(shards), batch_size=4, num_workers=0, eval_views=2, predict_from=str(path))
    dm.index.multi_label = True  # unlabelled multi-label targets are all zeros
    (batch,) = list(dm.predict_dataloader())
    assert batch["key"] == ["one_clip_wav"] and batch["meta"][0]["source"] == str(path)
    assert batch["audio"].shape[0] == 2 and batch["clip_index"].tolist() == [0, 0]  # eval views
    assert torch.equal(batch["label"], torch.zeros(1, 2))


def test_video_files_are_probed_for_their_frame_count(tmp_path: Path, shards: Path):
    write_mp4(tmp_path / "v.mp4", np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8), fps=8)
    dm = ShardDataModule(str(shards), num_workers=0, predict_from=str(tmp_path))
    dm.decode_config = type(dm.decode_config)(modalities=("video",), num_frames=4, frame_size=8)
    (batch,) = list(dm.predict_dataloader())
    assert batch["key"] == ["v_mp4"] and batch["video"].shape == (1, 4, 3, 8, 8)
    assert batch["meta"][0]["media"]["mp4"]["frames"] == 5


@pytest.mark.parametrize("predict_from, world", [(None, 1), ("test", 2), ("val", 1)])
def test_split_mode_yields_the_splits_keys_exactly_once(shards: Path, predict_from, world: int):
    keys = []
    for rank in range(world):
        dm = as_rank(ShardDataModule(str(shards), batch_size=2, num_workers=1, predict_from=predict_from), rank, world)
        loader = dm.predict_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches)
        keys += [k for b in batches for k in b["key"]]
        assert all("source" in m for b in batches for m in b["meta"])
        assert dm.skipped["predict"] == 0
    split = predict_from or "test"
    count = dm.index.splits[split].num_samples
    assert count >= 2 and sorted(keys) == [f"{split}_{i:07d}" for i in range(count)]


def test_missing_path_and_folder_without_media_are_errors(shards: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"'nowhere/clips' is neither a split \(train, val, test\) nor an existing"):
        ShardDataModule(str(shards), predict_from="nowhere/clips")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no media files in folder .*empty .*avi, flac, .*wav.*1 other files"):
        ShardDataModule(str(shards), predict_from=str(empty))
    with pytest.raises(ValueError, match=r"unsupported extension '.txt'"):
        ShardDataModule(str(shards), predict_from=str(empty / "sub" / "readme.txt"))
    dm = ShardDataModule(str(shards))  # the default split exists only when predicting
    assert dm.predict_from == "test"


def test_training_decoder_still_requires_a_label(shards: Path, tmp_path: Path):
    from mormm.data.decode import DecodeError

    dm = ShardDataModule(str(shards), num_workers=0)
    sample = {"__key__": "k", "json": b'{"source": "x"}', "wav": write_wav(tmp_path / "x.wav").read_bytes()}
    with pytest.raises(DecodeError, match=r"no label"):
        dm._decoder(train=False)(sample)


# ---------------------------------------------------------------------------------------------
# PredictionWriter under trainer.predict, with a small real model.


def tiny_module(num_classes: int):
    from encoders import AudioTokenizer
    from mormm.backbone import BackboneConfig, MoRBackbone, TokenChoiceRouter
    from mormm.heads import ClassTokenPooling
    from mormm.lit import MoRModule

    torch.manual_seed(0)
    tokenizer = AudioTokenizer(dim=16, n_mels=16, layout="frames", frames_per_token=2, freq_mask=0, time_mask=0)
    backbone = MoRBackbone(BackboneConfig(dim=16, num_heads=2, num_layers=4, num_recursions=2, rope_axes=2),
                           TokenChoiceRouter())
    return MoRModule(tokenizer, backbone, num_classes=num_classes, pooling=ClassTokenPooling(16))


def predict(dm: ShardDataModule, module, output: Path):
    import lightning as L

    from mormm.predict import PredictionWriter

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PredictionWriter(str(output))])
    return trainer, trainer.predict(module, datamodule=dm)


def test_predicted_depths_are_the_analysis_content_tokens_and_stay_out_of_memory(
    shards: Path, media_folder: Path, tmp_path: Path
):
    from mormm.analysis.collect import collect

    dm = ShardDataModule(str(shards), batch_size=2, num_workers=0, predict_from=str(media_folder))
    module = tiny_module(dm.num_classes)
    trainer, returned = predict(dm, module, tmp_path / "p.jsonl")
    assert returned is None and trainer.predict_loop.predictions == []  # written, not kept
    rows = {r["key"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert rows.keys() == GOOD.keys()

    module.eval()
    with torch.no_grad():
        for batch in dm.predict_dataloader():
            out = module(batch)
            assert out.backbone.depth.shape[1] == module.model.tokenize(batch).embeddings.shape[1] + 1  # class token
            clips, _ = collect(batch, out, module.model.tokenizer, dm.decode_config, {0: "audio"})
            for clip in clips:
                assert rows[clip.key]["depth"] == clip.depth.tolist()
                assert rows[clip.key]["mean_depth"] == pytest.approx(float(clip.depth.mean()), abs=1e-4)


def test_every_input_skipped_is_an_error_that_says_why(shards: Path, tmp_path: Path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        (folder / name).write_bytes(b"RIFF\x00\x00garbage" * 10)
    dm = ShardDataModule(str(shards), batch_size=2, num_workers=0, predict_from=str(folder))
    with pytest.raises(ValueError, match=r"no predictions written: all 2 inputs were skipped .*first reason: .*a\.wav"):
        predict(dm, tiny_module(dm.num_classes), tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()
