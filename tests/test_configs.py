"""Every YAML under configs/ parses, instantiates and runs a forward pass; baselines differ from
their MoR config only in sharing and router; short real fits for audio, video and audio+video;
the quickstart learns; the EMA snippet of the config comments works."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from mormm.cli import build_cli
from mormm.data import ensure_demo
from mormm.lit import MoRModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("**/*.yaml"))
BASELINES = [c for c in CONFIGS if c.endswith(("_vanilla.yaml", "_recursive.yaml"))]


@pytest.fixture(scope="module", autouse=True)
def demos():
    """Generate the demos once (into $MORMM_CACHE or ~/.cache/mormm, as `mormm fit` would)."""
    for kind in ("audio", "video", "audio_video"):
        ensure_demo(kind)


pytestmark = pytest.mark.usefixtures("cli_in_repo")


def quiet(tmp_path: Path) -> list[str]:
    """Overrides that keep a run small, silent and inside tmp_path."""
    return [
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0",
        "--data.num_workers", "0",
    ]


def short(tmp_path: Path) -> list[str]:
    return [*quiet(tmp_path), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--data.batch_size", "4", "--data.shuffle_buffer", "8"]


def test_configs_are_found():
    assert "configs/quickstart.yaml" in CONFIGS
    for family in ("audio/keywords", "audio/events", "video/tubelets", "audio_video/av"):
        for suffix in ("", "_vanilla", "_recursive"):
            assert f"configs/{family}{suffix}.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_config_instantiates_and_runs_a_forward_pass(config: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = build_cli(["--config", config, *quiet(tmp_path), "--data.batch_size", "2"], run=False)
    model, data = cli.model, cli.datamodule
    assert isinstance(model, MoRModule) and model.num_classes == data.num_classes
    batch = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out.logits.shape == (2, data.num_classes) and out.logits.isfinite().all()


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


BACKBONE = "model.backbone.init_args."
MAY_DIFFER = {"trainer.default_root_dir", "trainer.logger.init_args.save_dir",
              BACKBONE + "config.sharing", BACKBONE + "config.num_recursions"}


@pytest.mark.parametrize("baseline", BASELINES)
def test_baseline_differs_from_its_mor_config_only_in_sharing_and_router(baseline: str):
    mor_path = baseline.replace("_vanilla.yaml", ".yaml").replace("_recursive.yaml", ".yaml")
    base, mor = (_flatten(yaml.safe_load((ROOT / p).read_text())) for p in (baseline, mor_path))
    assert base[BACKBONE + "router"] is None and mor[BACKBONE + "router.class_path"]
    base_rest = {k: v for k, v in base.items() if k not in MAY_DIFFER and not k.startswith(BACKBONE + "router")}
    mor_rest = {k: v for k, v in mor.items() if k not in MAY_DIFFER and not k.startswith(BACKBONE + "router")}
    assert base_rest == mor_rest  # same tokenizer, width, effective depth, data and schedule
    if baseline.endswith("_vanilla.yaml"):
        assert base[BACKBONE + "config.sharing"] == "none" and base[BACKBONE + "config.num_recursions"] == 1
    else:
        for key in ("config.sharing", "config.num_recursions"):
            assert base[BACKBONE + key] == mor[BACKBONE + key]
    name = Path(baseline).stem
    assert base["trainer.default_root_dir"] == f"runs/{name}" == base["trainer.logger.init_args.save_dir"]


@pytest.mark.parametrize("config", ["configs/audio/keywords.yaml", "configs/video/tubelets.yaml",
                                    "configs/audio_video/av.yaml"])
def test_short_fit(config: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = build_cli(["fit", "--config", config, *short(tmp_path)])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_ema_callback_from_the_config_comments(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = build_cli(["fit", "--config", "configs/quickstart.yaml", *short(tmp_path),
                     "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
                     "--trainer.callbacks.decay", "0.9"])
    ema = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMAWeightAveraging"]
    assert len(ema) == 1 and cli.trainer.global_step == 2
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_quickstart_learns_well_above_chance(tmp_path: Path, monkeypatch):
    # 4 balanced classes: chance is 0.25. Five epochs (125 steps, the schedule compressed to
    # them) of the quickstart; its full 15 epochs reach ~1.0.
    monkeypatch.chdir(ROOT)
    cli = build_cli(["fit", "--config", "configs/quickstart.yaml", *quiet(tmp_path),
                     "--trainer.max_epochs", "5"])
    acc = float(cli.trainer.callback_metrics["val/acc"])
    print(f"quickstart val/acc after 5 epochs: {acc:.3f}")
    assert acc > 0.6, f"val/acc={acc:.3f} after 5 epochs"
