"""Launching ops per eager inference forward at the harness's token grids, counted without a GPU.

Short clips in eager mode are bound by the host: each aten op that launches work costs a
dispatch and a kernel launch, so this count (the harness's `kernels` column) predicts who wins
there. The harness counts on the device it times; this counts on the CPU under bf16 autocast at
batch 1 (the count does not depend on the batch), with the attention of steps that carry padding
slots counted as one kernel, as the CUDA varlen path launches (the CPU takes masked SDPA instead).
At 7fced0b these counts equal the H200 runs' `kernels` column for vanilla and expert-choice.

    python benchmarks/launch_counts.py [--variants ...] [--shapes ...]
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

from mormm.backbone import layers
from mormm.bench.models import CAPACITIES, DEPTH, SHAPES, VARIANTS, Shape, build_model, make_inputs
from mormm.bench.timing import KernelCounter


def count(variant: str, shape: str, dim: int = 384, heads: int = 6) -> int:
    model = build_model(VARIANTS[variant], dim, heads, DEPTH, len(CAPACITIES)).eval()
    inputs = make_inputs(Shape(shape, 1, SHAPES[shape].grid), dim, torch.device("cpu"))
    # What CUDA runs for steps with padding slots: one flash varlen kernel, no key mask.
    varlen = lambda q, k, v, cu_seqlens, longest: torch.ops.aten.clone(q)  # noqa: E731
    with mock.patch.object(layers, "_varlen_ok", lambda q: True), \
            mock.patch.object(layers, "_varlen_attention", varlen), \
            torch.no_grad(), torch.autocast("cpu", torch.bfloat16), KernelCounter() as kernels:
        model(*inputs)
    return kernels.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    print("| variant | " + " | ".join(shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for v in args.variants.split(","):
        print(f"| {v} | " + " | ".join(str(count(v, s)) for s in shapes) + " |", flush=True)


if __name__ == "__main__":
    main()
