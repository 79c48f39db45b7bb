"""`mormm` end to end: predictions written per clip, clear user errors with exit code 2, and a
two-process CPU (gloo) DDP `mormm fit`."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mormm.cli import main
from mormm.data import ensure_demo, write_shards

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = "configs/quickstart.yaml"


pytestmark = pytest.mark.usefixtures("cli_in_repo")


def small(out: Path) -> list[str]:
    return [
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--data.batch_size", "4", "--data.num_workers", "0", "--data.shuffle_buffer", "8",
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    ensure_demo("audio")
    out = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["mormm"])
        mp.chdir(ROOT)
        assert main(["fit", "--config", QUICKSTART, *small(out)]) == 0
    return out / "version_0" / "checkpoints" / "last.ckpt"


def test_predict_writes_class_probability_and_depth_per_clip(checkpoint: Path, tmp_path: Path):
    rc = main(["predict", "--config", QUICKSTART, *small(tmp_path), "--ckpt_path", str(checkpoint),
               "--data.predict_from", "val", "--trainer.limit_predict_batches", "2"])
    assert rc == 0
    files = list(tmp_path.glob("**/predictions.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    for r in rows:
        assert r["class"] in ("rise", "fall", "pulse", "wobble")
        assert 0.25 <= r["probability"] <= 1.0 and r["top5"][0] == [r["class"], r["probability"]]
        assert r["depth"] and all(d in (1, 2) for d in r["depth"])  # quickstart: N_r = 2
        assert sum(d == 2 for d in r["depth"]) == math.ceil(len(r["depth"]) / 2)  # capacity 1/2
        assert math.isclose(r["mean_depth"], sum(r["depth"]) / len(r["depth"]), abs_tol=1e-3)


@pytest.fixture
def batcher_calls(monkeypatch) -> list:
    """The batch each DepthwiseBatcher step admitted, from here on (None: a step admitting
    none). Every step goes through `_advance`, whether `batcher(tokens)` or `offer` called it."""
    from mormm.backbone import DepthwiseBatcher

    calls = []
    real = DepthwiseBatcher._advance
    monkeypatch.setattr(DepthwiseBatcher, "_advance",
                        lambda self, batch=None: calls.append(batch) or real(self, batch))
    return calls


def test_depthwise_predict_writes_the_forwards_predictions(checkpoint: Path, tmp_path: Path,
                                                           batcher_calls: list):
    """--model.depthwise true (given with a checkpoint whose saved hyperparameters say false):
    three batches through a pipeline of two (quickstart N_r = 2), the last one written after the
    data ran out, as the batch-by-batch run writes them."""
    records = {}
    for depthwise in ("false", "true"):
        out = tmp_path / depthwise
        assert 0 == main(["predict", "--config", QUICKSTART, *small(out), "--ckpt_path",
                          str(checkpoint), "--data.predict_from", "val",
                          "--trainer.limit_predict_batches", "3", "--model.depthwise", depthwise])
        (file,) = out.glob("**/predictions.jsonl")
        records[depthwise] = [json.loads(line) for line in file.read_text().splitlines()]
        # three batches admitted, then one call that finishes the last (flush)
        expected = [False] * 3 + [True] if depthwise == "true" else []
        assert [t is None for t in batcher_calls] == expected
    plain, piped = records["false"], records["true"]
    assert len(piped) == len(plain) == 12
    for a, b in zip(plain, piped):
        assert (a["key"], a["class"], a["depth"]) == (b["key"], b["class"], b["depth"])
        assert math.isclose(a["probability"], b["probability"], abs_tol=1e-5)


def test_depthwise_test_logs_the_forwards_metrics(checkpoint: Path, tmp_path: Path,
                                                  batcher_calls: list):
    """`mormm test --model.depthwise true`: three batches through the pipeline, the last one
    finished when the epoch ends, and the logged test metrics and depth statistics are those of
    the batch-by-batch run."""
    logged = {}
    for depthwise in ("false", "true"):
        out = tmp_path / depthwise
        assert 0 == main(["test", "--config", QUICKSTART, *small(out), "--ckpt_path",
                          str(checkpoint), "--trainer.limit_test_batches", "3",
                          "--model.depthwise", depthwise])
        (file,) = out.glob("**/metrics.csv")
        with file.open() as f:
            logged[depthwise] = {k: float(v) for row in csv.DictReader(f)
                                 for k, v in row.items() if k.startswith("test/") and v}
    assert [t is None for t in batcher_calls] == [False] * 3 + [True]
    plain, piped = logged["false"], logged["true"]
    assert {"test/acc", "test/loss", "test/depth/mean"} <= plain.keys() == piped.keys()
    for k, v in plain.items():
        assert math.isclose(piped[k], v, rel_tol=1e-5, abs_tol=1e-6), k


def test_depthwise_fit_validates_through_the_pipeline_and_logs_what_the_forward_logs(
        tmp_path: Path, batcher_calls: list):
    """`mormm fit --model.depthwise true`: the sanity check and the epoch's validation each run
    a pipeline of their own, emptied at their end (training steps in between take the forward),
    and every logged value, training's too, is the batch-by-batch run's."""
    ensure_demo("audio")
    logged = {}
    for depthwise in ("false", "true"):
        out = tmp_path / depthwise
        assert 0 == main(["fit", "--config", QUICKSTART, *small(out),
                          "--trainer.num_sanity_val_steps", "2", "--trainer.limit_val_batches", "3",
                          "--model.depthwise", depthwise])
        (file,) = out.glob("**/metrics.csv")
        with file.open() as f:
            logged[depthwise] = [{k: float(v) for k, v in row.items() if v}
                                 for row in csv.DictReader(f)]
    assert [t is None for t in batcher_calls] == [False] * 2 + [True] + [False] * 3 + [True]
    plain, piped = logged["false"], logged["true"]
    assert any("val/depth/mean" in row for row in plain) and len(plain) == len(piped)
    for a, b in zip(plain, piped):
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert math.isclose(b[k], v, rel_tol=1e-5, abs_tol=1e-6), k


# -- user errors: exit code 2 and one readable message, no traceback -----------------------------


def test_missing_dataset_names_the_path(tmp_path: Path, capsys):
    missing = tmp_path / "no_such_shards"
    assert main(["fit", "--config", QUICKSTART, *small(tmp_path), "--data.dataset", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "mormm shards" in err and "Traceback" not in err


def two_class_shards(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("low", "high"):
        for i in range(6):
            (root / "in" / name).mkdir(parents=True, exist_ok=True)
            sf.write(root / "in" / name / f"{i}.wav", rng.uniform(-0.3, 0.3, 16_000).astype(np.float32), 16_000)
    return write_shards(root / "in", root / "shards", split=[0.5, 0.5], max_samples=4).output


def test_class_count_mismatch_with_a_checkpoint_is_explained(checkpoint: Path, tmp_path: Path, capsys):
    shards = two_class_shards(tmp_path)
    rc = main(["fit", "--config", QUICKSTART, *small(tmp_path / "run"), "--data.dataset", str(shards),
               "--ckpt_path", str(checkpoint)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "trained for 4 classes but the data has 2" in err and "init_from" in err


@pytest.mark.parametrize("override", [
    ["--model.backbone.init_args.router.class_path", "mormm.backbone.ExpertChoiseRouter"],
    ["--model.tokenizer.class_path", "encoders.AudioTokeniser"],
])
def test_unknown_component_is_a_short_clear_error(override: list[str], tmp_path: Path, capsys):
    assert main(["fit", "--config", QUICKSTART, *small(tmp_path), *override]) == 2
    err = capsys.readouterr().err
    typo = override[1].rsplit(".", 1)[1]
    assert f"has no attribute '{typo}'" in err and "Traceback" not in err
    assert "usage:" not in err and len(err.splitlines()) < 30 and "mormm fit --help" in err


def test_unknown_option_is_a_short_clear_error(tmp_path: Path, capsys):
    assert main(["fit", "--config", QUICKSTART, "--trainer.max_epochz", "3"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --trainer.max_epochz 3" in err and "usage:" not in err


@pytest.mark.parametrize("override, message", [
    (["--trainer.max_epochs", "-3"], "`max_epochs` must be a non-negative integer or -1"),
    pytest.param(["--trainer.accelerator", "mps"], "MPSAccelerator` can not run on your system",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has MPS")),
])
def test_trainer_setting_lightning_rejects_is_a_short_clear_error(override, message, tmp_path: Path,
                                                                   capsys):
    assert main(["fit", "--config", QUICKSTART, *small(tmp_path), *override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) < 10


def test_progress_bar_can_be_disabled(tmp_path: Path):
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

    from mormm.cli import build_cli

    default = build_cli(["--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(default.trainer.progress_bar_callback, RichProgressBar)
    # small() passes --trainer.enable_progress_bar false: the default bar must step aside.
    quiet = build_cli(["--config", QUICKSTART, *small(tmp_path)], run=False)
    assert not any(isinstance(c, ProgressBar) for c in quiet.trainer.callbacks)


def test_debug_variable_shows_the_traceback(tmp_path: Path, monkeypatch, capsys):
    missing = str(tmp_path / "no_such_shards")
    args = ["fit", "--config", QUICKSTART, *small(tmp_path), "--data.dataset", missing]
    assert main(args) == 2 and "MORMM_DEBUG=1" in capsys.readouterr().err
    monkeypatch.setenv("MORMM_DEBUG", "1")
    with pytest.raises((ValueError, FileNotFoundError), match="no_such_shards"):
        main(args)


# -- distributed: two CPU processes over gloo, through the real console entry point --------------


def test_two_process_ddp_fit(tmp_path: Path):
    ensure_demo("audio")
    cmd = [sys.executable, "-m", "mormm.cli", "fit", "--config", QUICKSTART, *small(tmp_path),
           "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert ckpt["global_step"] == 2  # 2 steps on each rank, in lockstep
    assert all(t.isfinite().all() for t in ckpt["state_dict"].values())
    metrics = (tmp_path / "version_0" / "metrics.csv").read_text()
    assert "val/acc" in metrics.splitlines()[0]
