"""What one call costs the host and the GPU: SDPA at every routed step's shape (batch 1 and the
shape's batch, capacities 1, 3/4, 1/2, 1/4) per backend, and a few routing ops at 1 s audio.
(host us, device us) per call: the host's time to issue 50 calls from an idle device, then CUDA
events over 50 more:

    python benchmarks/host_ops.py   # JSON on stdout's last line
"""
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from mormm.bench.models import CAPACITIES, SHAPES

B = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

def meas(fn, n=50):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); e.synchronize()
    return round(host, 1), round(s.elapsed_time(e) / n * 1e3, 1)

rows = []
for sh in ("audio1s", "image", "video"):
    shape = SHAPES[sh]
    for c in CAPACITIES:
        L = int(shape.tokens * c)
        for batch in (1, shape.batch):
            q, k, v = (torch.randn(batch, 6, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            row = dict(shape=sh, batch=batch, L=L)
            for name, b in B.items():
                if name == "math" and batch > 1: continue
                f = lambda: F.scaled_dot_product_attention(q, k, v)
                try:
                    if b is None: row[name] = meas(f)
                    else:
                        with sdpa_kernel(b): row[name] = meas(f)
                except RuntimeError:  # no kernel of this backend for the shape
                    row[name] = None
            rows.append(row); print(row, flush=True)
x = torch.rand(256, 108, device="cuda")
m = torch.rand(256, 108, device="cuda") > 0.5
other = dict(topk=meas(lambda: x.topk(54, dim=-1)), cumsum_i32=meas(lambda: m.cumsum(-1, dtype=torch.int32)),
             sum=meas(lambda: m.sum(-1)), lerp=meas(lambda: torch.lerp(x, x, x)))
print(other, flush=True)
print(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                      cudnn=torch.backends.cudnn.version(), sdpa=rows, other=other)))
