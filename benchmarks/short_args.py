"""The options shared by the scripts that time the short shapes on a GPU (code_ab.py,
train_stats.py, train_host.py, host_bound.py), with the device they name, and their output."""

from __future__ import annotations

import argparse
import json

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


def add_md(p: argparse.ArgumentParser) -> None:
    p.add_argument("--md", help="also write the table here")


def emit(args: argparse.Namespace, result: dict, table: str) -> None:
    """Print the markdown table; write it to args.md (add_md) and the result to args.json where
    given."""
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
