"""What the host pays to issue work: one launch of each routing kernel, and one eager forward.

Short clips in eager mode are bound by the host, not the GPU, so these two numbers decide
whether MoR beats vanilla there: the host time of a launch (2000 calls on tiny CUDA tensors, the
device idle) and of a whole forward at batch 1 (median and min of 9 rounds of 50, the variants
in turns so that a drift of the host falls on all of them):

    python benchmarks/host_cost.py [shape] [variants]   # default: audio1s, the main variants
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from mormm.backbone import fused
from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, build_model, make_inputs, shape_table, width
from mormm.bench.timing import autocast


def host_us(fn, n: int = 2000, warmup: int = 100) -> float:
    """us the host takes per call of fn, issuing n in a row from an idle device."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def launches(dev: torch.device) -> dict[str, float]:
    x, w = torch.randn(1, 8, 384, device=dev), torch.randn(384, device=dev)
    g, seq = torch.rand(1, 8, device=dev), torch.randn(1, 16, 384, device=dev)
    where = torch.arange(8, device=dev)[None]
    return {
        "fused.merge_rows": host_us(lambda: fused.merge_rows(x, x, x, g, True)),
        "fused.merge_rows with scores, into the sequence":
            host_us(lambda: fused.merge_rows(x, x, x, g, True, w, seq, where)),
        "fused.gather_rows": host_us(lambda: fused.gather_rows(seq, where)),
        "fused.gather_rows, two tensors": host_us(lambda: fused.gather_rows(seq, where, seq)),
        "torch.lerp": host_us(lambda: torch.lerp(x, x, g[..., None])),
        "add": host_us(lambda: x + x),
        "topk": host_us(lambda: g.topk(4, dim=-1)),
        "index_select": host_us(lambda: seq[0].index_select(0, where[0])),
    }


def forwards(dev: torch.device, shape: str, variants: list[str]) -> dict[str, list[float]]:
    dim, heads = width(small=False)
    inputs = make_inputs(shape_table(small=False, batch=1)[shape], dim, dev)
    models = {}
    for v in variants:
        name, _, option = v.partition("@")  # "mor_ec@unfused": fused merges off
        models[v] = build_model(VARIANTS[name], dim, heads, DEPTH, len(CAPACITIES),
                                fused_merge=option != "unfused").to(dev).eval()

    for m in models.values():
        host_ms(m, inputs, dev, 20)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(9):
        for v, m in models.items():
            times[v].append(host_ms(m, inputs, dev))
    return times


def host_ms(model, inputs, dev: torch.device, n: int = 50) -> float:
    """ms the host takes per forward, issuing n in a row from an idle device. One autocast region
    for the n forwards: a weight is cast to bf16 in the first of them and the cast reused by the
    rest (the harness opens a region per forward). In a row, the device's pace shows where it is
    the slower side (on the fastest H200 host, 4.0 ms of device time per batch-1 expert-choice
    forward against 3.8 ms of host time); timing.host_times times one from an idle device."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(dev):
        for _ in range(n):
            model(*inputs)
    ms = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return ms


def main() -> None:
    dev = torch.device("cuda")
    shape = sys.argv[1] if len(sys.argv) > 1 else "audio1s"
    variants = (sys.argv[2] if len(sys.argv) > 2 else
                "vanilla,recursive,mor_ec,mor_ec@unfused,mor_ec_segment,mor_tc").split(",")
    print(f"# Host cost: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| launch | host us |\n|---|---|")
    for name, us in launches(dev).items():
        print(f"| {name} | {us:.1f} |")
    print(f"\n| variant ({shape}, batch 1, eager) | host ms, median (min) |\n|---|---|")
    for v, t in forwards(dev, shape, variants).items():
        print(f"| {v} | {statistics.median(t):.2f} ({min(t):.2f}) |")


if __name__ == "__main__":
    main()
