"""`mormm` console script.

    mormm fit|validate|test|predict --config FILE [overrides]   LightningCLI
    mormm shards INPUT OUTPUT [options]                          write webdataset shards
    mormm bench [options]                                        backbone speed benchmark
    mormm analyze --config FILE --ckpt_path CKPT [options]       depth-allocation analysis
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from pathlib import Path
from unittest import mock

import torch
import yaml
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from mormm.data import LogSkippedSamples, ShardDataModule
from mormm.lit import MoRModule
from mormm.predict import PredictionWriter

TOOLS = ("shards", "bench", "analyze")


# Model options that choose how a run executes, not what the checkpoint's weights are: the config
# and command line of the run decide them. LightningCLI parses a --ckpt_path checkpoint's saved
# hyperparameters over the run's own, which dropped `--model.depthwise true` or
# `--model.compile reduce-overhead` given to `mormm predict` without a word.
RUN_OPTIONS = ("compile", "depthwise")


class MoRCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        command = self.config.get("subcommand")
        model = self.config[command].get("model") if command else None
        run = {k: model[k] for k in RUN_OPTIONS if k in model} if model is not None else {}
        super()._parse_ckpt_path()
        for k, v in run.items():
            self.config[command]["model"][k] = v

    def add_arguments_to_parser(self, parser) -> None:
        # Class names and count come from the dataset index: configs never repeat them.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.multi_label", "model.multi_label", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # The default RichProgressBar would make `--trainer.enable_progress_bar false` an error.
        if config.get("enable_progress_bar") is False:
            defaults = self.trainer_defaults.get("callbacks", [])
            self.trainer_defaults = {
                **self.trainer_defaults,
                "callbacks": [c for c in defaults if not isinstance(c, ProgressBar)],
            }
        return super()._instantiate_trainer(config, callbacks)


def trainer_defaults() -> dict:
    return {
        "accelerator": "auto",
        "devices": 1,
        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
        "gradient_clip_val": 1.0,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": "runs", "name": "mormm"}},
        "callbacks": [
            RichProgressBar(),
            ModelCheckpoint(monitor="val/acc", mode="max", save_last=True,
                            filename="best-{epoch}-{step}"),
            LearningRateMonitor(logging_interval="step"),
            LogSkippedSamples(),
            PredictionWriter(),
        ],
    }


def build_cli(args: list[str] | None = None, run: bool = True) -> MoRCLI:
    return MoRCLI(
        MoRModule,
        ShardDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        # Bad arguments raise ArgumentError (main prints its message without the full usage).
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def model_and_data(configs: list[str], overrides: list[str]) -> tuple[MoRModule, ShardDataModule]:
    """The model (fresh weights) and data that training configs and LightningCLI overrides
    build, without a run: what `mormm analyze` and `mormm bench --config` start from. A config
    saved by `mormm fit` (config.yaml beside its checkpoints) may be given as it is."""
    args = [a for c in configs for a in ("--config", _without_run_keys(c))] + list(overrides)
    # LightningCLI warns when sys.argv carries arguments besides `args`; here they are ours.
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = build_cli(args, run=False)
    return cli.model, cli.datamodule


# Top-level sections of a config that describe the model and data; the config.yaml that `mormm
# fit` saves next to its checkpoints also holds the fit command's own keys (ckpt_path,
# weights_only, ...), which the model/data parser does not accept.
CONFIG_SECTIONS = ("seed_everything", "trainer", "model", "data")


def _without_run_keys(config: str) -> str:
    """The config as given, or its content without keys other than CONFIG_SECTIONS."""
    path = Path(config)
    if not path.is_file():
        return config
    content = yaml.safe_load(path.read_text())
    if not isinstance(content, dict) or set(content) <= set(CONFIG_SECTIONS):
        return config
    return yaml.safe_dump({k: v for k, v in content.items() if k in CONFIG_SECTIONS})


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        return _tool(args[0], args[1:])
    try:
        # LightningCLI reads sys.argv itself when run as the console script.
        build_cli(argv)
    except ArgumentError as e:  # unknown option, class_path typo, bad value: no 100-line usage
        command = "mormm " + (args[0] if args and args[0] in MoRCLI.subcommands() else "")
        print(f"error: {e}\n(options: {command.strip()} --help)", file=sys.stderr)
        return 2
    # A user error with its own clear message; Lightning raises MisconfigurationException for the
    # Trainer settings it rejects (max_epochs -3, GPUs asked of a machine without any).
    except (ValueError, FileNotFoundError, MisconfigurationException) as e:
        return user_error(e)
    return 0


def user_error(e: Exception) -> int:
    """Print a user error as one message (exit code 2); MORMM_DEBUG=1 re-raises it with its
    traceback, for the errors that turn out to be ours."""
    if os.environ.get("MORMM_DEBUG"):
        raise e
    print(f"error: {e}\n(MORMM_DEBUG=1 shows the traceback)", file=sys.stderr)
    return 2


def _tool(name: str, argv: list[str]) -> int:
    if name == "shards":
        from mormm.data.shards import main as tool
    elif name == "bench":
        from mormm.bench.harness import main as tool
    else:
        from mormm.analysis.cli import main as tool
    return tool(argv)


if __name__ == "__main__":
    sys.exit(main())
