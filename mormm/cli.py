"""`mormm` console script.

    mormm fit|validate|test|predict --config FILE [overrides]   LightningCLI
    mormm shards INPUT OUTPUT [options]                          write webdataset shards
    mormm bench [options]                                        backbone speed benchmark
    mormm analyze --config FILE --ckpt_path CKPT [options]       depth-allocation analysis
"""

from __future__ import annotations

import sys

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from mormm.data import LogSkippedSamples, ShardDataModule
from mormm.lit import MoRModule
from mormm.predict import PredictionWriter

TOOLS = ("shards", "bench", "analyze")


class MoRCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Class names and count come from the dataset index: configs never repeat them.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.multi_label", "model.multi_label", apply_on="instantiate")


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
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        return _tool(args[0], args[1:])
    try:
        # LightningCLI reads sys.argv itself when run as the console script.
        build_cli(argv)
    except ValueError as e:  # a user error with its own clear message: no deep stack trace
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


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
