"""Is a compiled forward bound by the host or the GPU? Per variant (compiled with mormm's
options, bf16 autocast inference): ms per forward in bursts of 20 (median of 5), the host's time
to issue one from an idle device (10 in a row), and under torch.profiler (10 forwards) the
kernel time per forward, the time the GPU was busy, the span from first to last kernel, and the
host ops with the most self time per forward. Inductor's Python wrapper (what mormm ran before
mormm.backbone.inference_config; the C++ one is what this probe led to):

    python benchmarks/compiled_host.py audio1s,image vanilla,mor_ec,mor_tc   # JSON last line
"""

from __future__ import annotations

import json
import sys
import time

import torch
from host_cost import host_us  # benchmarks/, the script's folder
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mormm.backbone import compile_options
from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, build_model, make_inputs, shape_table, width
from mormm.bench.timing import autocast, timed

PROFILED = 10  # forwards under the profiler


def busy_us(kernels) -> float:
    """Time at least one kernel ran: the union of the kernels' intervals."""
    busy, start, end = 0, None, None
    for s, e in sorted((k.time_range.start, k.time_range.end) for k in kernels):
        if end is None or s > end:
            busy += 0 if end is None else end - start
            start, end = s, e
        else:
            end = max(end, e)
    return busy + (0 if end is None else end - start)


def probe(shape: str, variant: str, dev: torch.device) -> dict:
    dim, heads = width(small=False)
    inputs = make_inputs(shape_table(small=False)[shape], dim, dev)
    torch.manual_seed(0)
    model = build_model(VARIANTS[variant], dim, heads, DEPTH, len(CAPACITIES)).to(dev).eval()
    compiled = torch.compile(model, options=compile_options())

    def forward():
        with torch.no_grad(), autocast(dev):
            compiled(*inputs)

    t0 = time.perf_counter()
    for _ in range(5):
        forward()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    wall = sorted(timed(forward, dev, 20) for _ in range(5))[2] * 1e3
    # Issued from an idle device, 10 forwards do not fill the launch queue of a host-bound model.
    issue = host_us(forward, 10, warmup=0) / 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            forward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    starts, ends = (min(k.time_range.start for k in kernels),
                    max(k.time_range.end for k in kernels))
    host_ops = sorted(((e.key, e.self_cpu_time_total / PROFILED, e.count / PROFILED)
                       for e in prof.key_averages() if e.device_type == DeviceType.CPU),
                      key=lambda r: -r[1])[:25]
    row = dict(shape=shape, variant=variant, compile_s=round(compile_s, 1),
               wall_ms=round(wall, 3), issue_ms=round(issue, 3),
               kernel_ms=round(sum(k.time_range.elapsed_us() for k in kernels) / PROFILED / 1e3, 3),
               busy_ms=round(busy_us(kernels) / PROFILED / 1e3, 3),
               span_ms=round((ends - starts) / PROFILED / 1e3, 3),
               launches=len(kernels) / PROFILED,
               cpu_top=[(k, round(us, 1), c) for k, us, c in host_ops])
    print(json.dumps({k: v for k, v in row.items() if k != "cpu_top"}), flush=True)
    for op in row["cpu_top"][:12]:
        print("   ", op)
    torch._dynamo.reset()
    return row


def main() -> None:
    dev = torch.device("cuda")
    print(json.dumps([probe(shape, v, dev) for shape in sys.argv[1].split(",")
                      for v in sys.argv[2].split(",")]))


if __name__ == "__main__":
    main()
