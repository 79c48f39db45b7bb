"""Compiled MoR with the fused step merge (fused.py) inside the graph against the unfused ops.

Before this A/B, torch.compile always took the unfused ops and let inductor fuse them; now a
compiled inference forward on CUDA runs fused.merge_rows as a user Triton kernel. One process
per shape list: vanilla, then each variant unfused and fused (same weights), each compiled with
mormm's inductor options; the outputs compared; the models timed in turns (3 untimed warm-up
calls each, then 9 rounds of one untimed and 10 timed calls, median), as the harness does:

    python benchmarks/compiled_merge.py [shapes] [variants] [rounds]
    # default: video,audio10s mor_ec,mor_ec_segment,mor_tc 9; JSON on stdout's last line
"""

from __future__ import annotations

import json
import sys
import time

import torch

from mormm.backbone import compile_options
from mormm.bench.models import CAPACITIES, DEPTH, SHAPES, VARIANTS, build_model, make_inputs, width
from mormm.bench.report import environment
from mormm.bench.timing import autocast, sync, time_alternating


def run(shape: str, variants: list[str], rounds: int, dev: torch.device) -> list[dict]:
    dim, heads = width(small=False)
    inputs = make_inputs(SHAPES[shape], dim, dev)
    cases = [("vanilla", True)] + [(v, fused) for v in variants for fused in (False, True)]
    fns, outs, compile_s = [], {}, {}
    for v, fused in cases:
        torch.manual_seed(0)
        model = build_model(VARIANTS[v], dim, heads, DEPTH, len(CAPACITIES), fused).to(dev).eval()
        compiled = torch.compile(model, options=compile_options())

        def forward(compiled=compiled):
            with torch.no_grad(), autocast(dev):
                return compiled(*inputs)

        t0 = time.perf_counter()
        outs[v, fused] = forward()[0].float()
        sync(dev)
        compile_s[v, fused] = time.perf_counter() - t0
        fns.append(forward)
    for v in variants:
        d = (outs[v, True] - outs[v, False]).abs()
        print(f"{shape} {v}: fused vs unfused, max |difference| {d.max().item():.3g}", flush=True)
    times = time_alternating(fns, dev, 3, rounds, 10)
    rows = [dict(shape=shape, variant=v, fused=fused, ms=t * 1e3, speedup=times[0] / t,
                 compile_s=compile_s[v, fused]) for (v, fused), t in zip(cases, times)]
    for r in rows:
        print(f"| {shape} | {r['variant']} | {'fused' if r['fused'] else 'unfused'} | "
              f"{r['ms']:.3f} | {r['speedup']:.3f} |", flush=True)
    return rows


def main() -> None:
    dev = torch.device("cuda")
    shapes = (sys.argv[1] if len(sys.argv) > 1 else "video,audio10s").split(",")
    variants = (sys.argv[2] if len(sys.argv) > 2 else "mor_ec,mor_ec_segment,mor_tc").split(",")
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 9
    rows = []
    for shape in shapes:
        rows += run(shape, variants, rounds, dev)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(json.dumps({"env": environment(dev), "rows": rows}))


if __name__ == "__main__":
    main()
