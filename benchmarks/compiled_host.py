"""Is a compiled forward bound by the host or the GPU? Per variant (compiled with mormm's
options, bf16 autocast inference): ms per forward in bursts of 20 (median of 5), the host's time
to issue one from an idle device (10 in a row), and under torch.profiler (10 forwards) the
kernel time per forward, the time the GPU was busy, the span from first to last kernel, and the
host ops with the most self time per forward. Inductor's Python wrapper (what mormm ran before
mormm.backbone.inference_config; the C++ one is what this probe led to):

    python benchmarks/compiled_host.py audio1s,image vanilla,mor_ec,mor_tc   # JSON last line
"""
import json
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from mormm.backbone import compile_options
from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, build_model, make_inputs, shape_table, width
from mormm.bench.timing import autocast, timed

dev = torch.device("cuda")
dim, heads = width(small=False)
out = []
for shape in sys.argv[1].split(","):
    inputs = make_inputs(shape_table(small=False)[shape], dim, dev)
    for v in sys.argv[2].split(","):
        torch.manual_seed(0)
        m = build_model(VARIANTS[v], dim, heads, DEPTH, len(CAPACITIES)).to(dev).eval()
        run = torch.compile(m, options=compile_options())
        def f():
            with torch.no_grad(), autocast(dev): run(*inputs)
        t0 = time.perf_counter()
        for _ in range(5): f()
        torch.cuda.synchronize(); comp = time.perf_counter() - t0
        wall = sorted(timed(f, dev, 20) for _ in range(5))[2] * 1e3
        # host issue time for 10 forwards from idle (queue does not fill if host-bound)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(10): f()
        issue = (time.perf_counter() - t0) / 10 * 1e3
        torch.cuda.synchronize()
        n = 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n): f()
            torch.cuda.synchronize()
        ev = prof.events()
        kern = [e for e in ev if e.device_type == DeviceType.CUDA]
        ksum = sum(e.time_range.elapsed_us() for e in kern) / n / 1e3
        iv = sorted((e.time_range.start, e.time_range.end) for e in kern)
        busy, cur_s, cur_e = 0, None, None
        for s, e in iv:
            if cur_e is None or s > cur_e:
                if cur_e is not None: busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else: cur_e = max(cur_e, e)
        busy += cur_e - cur_s
        span = (iv[-1][1] - iv[0][0]) / n / 1e3
        cpu = sorted(((e.key, e.self_cpu_time_total / n, e.count / n) for e in prof.key_averages()
                      if e.device_type == DeviceType.CPU), key=lambda r: -r[1])[:25]
        row = dict(shape=shape, variant=v, compile_s=round(comp, 1), wall_ms=round(wall, 3),
                   issue_ms=round(issue, 3), kernel_ms=round(ksum, 3), busy_ms=round(busy / n / 1e3, 3),
                   span_ms=round(span, 3), launches=len(kern) / n,
                   cpu_top=[(k, round(us, 1), c) for k, us, c in cpu])
        print(json.dumps({k: row[k] for k in row if k != "cpu_top"}), flush=True)
        for r in row["cpu_top"][:12]: print("   ", r)
        out.append(row)
        torch._dynamo.reset()
print(json.dumps(out))
