"""Compiled inference with inductor's Python wrapper against its C++ wrapper (`cpp_wrapper`).

A compiled forward's kernels are launched by a wrapper that inductor generates: Python by
default, C++ with `cpp_wrapper`. Where the host is the limit (short clips) the C++ wrapper
issues the same kernels sooner; mormm.backbone.inference_config turns it on for inference on
CUDA. One process per shape list: each variant compiled twice (same weights, inductor options
of mormm.backbone.compile_options, the C++ arm with `cpp_wrapper` added), outputs compared,
then timed in turns (5 warm-up calls, 7 turns of one untimed and 10 timed calls, median) and
the host's time to issue one forward from an idle device (median of 7):

    python benchmarks/cpp_wrapper.py [shapes] [variants]
    # default: audio1s,image vanilla,mor_ec,mor_tc; JSON on stdout's last line
"""

from __future__ import annotations

import json
import sys
import time

import torch

from mormm.backbone import compile_options
from mormm.bench.models import CAPACITIES, DEPTH, SHAPES, VARIANTS, build_model, make_inputs, width
from mormm.bench.report import environment
from mormm.bench.timing import autocast, host_times, time_alternating


def run(shape: str, variants: list[str], dev: torch.device) -> list[dict]:
    dim, heads = width(small=False)
    inputs = make_inputs(SHAPES[shape], dim, dev)
    fns, rows = [], []
    for v in variants:
        torch.manual_seed(0)
        model = build_model(VARIANTS[v], dim, heads, DEPTH, len(CAPACITIES)).to(dev).eval()
        outputs = {}
        for wrapper in ("python", "cpp"):
            options = compile_options() | ({"cpp_wrapper": True} if wrapper == "cpp" else {})
            compiled = torch.compile(model, options=options)

            def forward(compiled=compiled):
                with torch.no_grad(), autocast(dev):
                    return compiled(*inputs)

            t0 = time.perf_counter()
            for _ in range(3):
                outputs[wrapper] = forward()[0]
            torch.cuda.synchronize()
            rows.append({"shape": shape, "variant": v, "wrapper": wrapper,
                         "compile_s": time.perf_counter() - t0})
            fns.append(forward)
        d = (outputs["cpp"].float() - outputs["python"].float()).abs().max().item()
        print(f"{shape} {v}: C++ vs Python wrapper, max |difference| {d:.3g}", flush=True)
    for row, s, h in zip(rows, time_alternating(fns, dev, warmup=5, reps=7, inner=10),
                         host_times(fns, dev, reps=7)):
        row.update(infer_ms=s * 1e3, host_ms=h * 1e3)
        print(json.dumps(row), flush=True)
    torch._dynamo.reset()
    return rows


def main() -> None:
    dev = torch.device("cuda")
    shapes = (sys.argv[1] if len(sys.argv) > 1 else "audio1s,image").split(",")
    variants = (sys.argv[2] if len(sys.argv) > 2 else "vanilla,mor_ec,mor_tc").split(",")
    rows = [r for shape in shapes for r in run(shape, variants, dev)]
    print(json.dumps({"env": environment(dev), "rows": rows}))


if __name__ == "__main__":
    main()
