"""The options shared by the scripts that time the short shapes in turns on a GPU (code_ab.py,
train_stats.py), with the device they name."""

from __future__ import annotations

import argparse

import torch


def parser(doc: str, variants: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of `doc`, timing `variants` by default."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--shapes", default="audio1s,image")
    p.add_argument("--variants", default=variants)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="the harness's tiny shapes and width")
    return p


def device(args: argparse.Namespace) -> tuple[torch.device, str]:
    """args.device and the name a results table gives it."""
    dev = torch.device(args.device)
    return dev, torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
