"""What one call costs the host and the GPU: SDPA at every routed step's shape (batch 1 and the
shape's batch, capacities 1, 3/4, 1/2, 1/4) per backend, and a few routing ops at 1 s audio.
(host us, device us) per call: the host's time to issue 50 calls from an idle device, then CUDA
events over 50 more:

    python benchmarks/host_ops.py   # JSON on stdout's last line
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from host_cost import host_us  # benchmarks/, the script's folder
from sdpa_backends import HEAD_DIM, HEADS
from torch.nn.attention import SDPBackend, sdpa_kernel

from mormm.bench.models import CAPACITIES, SHAPES
from mormm.bench.timing import timed

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def cost(fn, n: int = 50) -> tuple[float, float]:
    """(host us, device us) per call."""
    return round(host_us(fn, n, warmup=10), 1), round(timed(fn, torch.device("cuda"), n) * 1e6, 1)


def sdpa(q, k, v, backend):
    with nullcontext() if backend is None else sdpa_kernel(backend):
        return cost(lambda: F.scaled_dot_product_attention(q, k, v))


def main() -> None:
    rows = []
    for name in ("audio1s", "image", "video"):
        shape = SHAPES[name]
        for c in CAPACITIES:
            L = int(shape.tokens * c)
            for batch in (1, shape.batch):
                q, k, v = (torch.randn(batch, HEADS, L, HEAD_DIM, device="cuda",
                                       dtype=torch.bfloat16) for _ in range(3))
                row = dict(shape=name, batch=batch, L=L)
                for backend, b in BACKENDS.items():
                    if backend == "math" and batch > 1:
                        continue
                    try:
                        row[backend] = sdpa(q, k, v, b)
                    except RuntimeError:  # no kernel of this backend for the shape
                        row[backend] = None
                rows.append(row)
                print(row, flush=True)
    x = torch.rand(256, 108, device="cuda")  # 1 s audio's batch x tokens
    m = torch.rand(256, 108, device="cuda") > 0.5
    other = dict(topk=cost(lambda: x.topk(54, dim=-1)),
                 cumsum_i32=cost(lambda: m.cumsum(-1, dtype=torch.int32)),
                 sum=cost(lambda: m.sum(-1)), lerp=cost(lambda: torch.lerp(x, x, x)))
    print(other, flush=True)
    print(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                          cudnn=torch.backends.cudnn.version(), sdpa=rows, other=other)))


if __name__ == "__main__":
    main()
