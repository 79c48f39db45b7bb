"""Where an eager batch-1 forward's host time goes, by Python function (cProfile): each variant's
top functions by own time per forward, and each function's difference from the first variant.
Every forward is issued from an idle device in its own autocast region, as the harness times it;
cProfile's own cost inflates Python-heavy code, so read the shares, not the totals:

    python benchmarks/host_profile.py [shape] [variants] [forwards]
    # default: audio1s recursive,vanilla,mor_ec,mor_tc 200
"""

from __future__ import annotations

import cProfile
import pstats
import sys

import torch

from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, build_model, make_inputs, shape_table, width
from mormm.bench.timing import autocast, sync

TOP = 25


def own_us(model, inputs, dev: torch.device, n: int) -> dict[str, tuple[float, float]]:
    """Own (not cumulative) host us and calls per forward of every function that ran, the wait
    for the device left out."""
    prof = cProfile.Profile()
    for _ in range(n):
        sync(dev)
        with torch.no_grad(), autocast(dev):
            prof.enable()
            model(*inputs)
            prof.disable()
    sync(dev)
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, ncalls, tottime, ...)}
    out: dict[str, tuple[float, float]] = {}
    for (file, line, name), (_, ncalls, tottime, _, _) in stats.items():
        key = name if file == "~" else f"{file.rsplit('/', 1)[-1]}:{line}:{name}"
        us, calls = out.get(key, (0.0, 0.0))
        out[key] = us + tottime / n * 1e6, calls + ncalls / n
    return out


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = sys.argv[1] if len(sys.argv) > 1 else "audio1s"
    variants = (sys.argv[2] if len(sys.argv) > 2 else "recursive,vanilla,mor_ec,mor_tc").split(",")
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    dim, heads = width(small=False)
    inputs = make_inputs(shape_table(small=False, batch=1)[shape], dim, dev)
    profiles = {}
    for v in variants:
        model = build_model(VARIANTS[v], dim, heads, DEPTH, len(CAPACITIES)).to(dev).eval()
        own_us(model, inputs, dev, 20)  # warm-up: kernels compiled, caches filled
        profiles[v] = own_us(model, inputs, dev, n)
    base = profiles[variants[0]]
    for v, prof in profiles.items():
        total = sum(us for us, _ in prof.values()) / 1e3
        print(f"\n## {v} ({shape}, batch 1): {total:.2f} ms of own time per forward under "
              f"cProfile\n\n| function | calls | us | us vs {variants[0]} |\n|---|---|---|---|")
        diff = {k: us - base.get(k, (0.0, 0))[0] for k, (us, _) in prof.items()}
        top = sorted(prof, key=lambda k: prof[k][0], reverse=True)[:TOP]
        more = sorted(diff, key=diff.get, reverse=True)[:TOP] if v != variants[0] else []
        for k in top + [k for k in more if k not in top]:
            us, calls = prof[k]
            print(f"| {k} | {calls:g} | {us:.0f} | {diff[k]:+.0f} |")


if __name__ == "__main__":
    main()
