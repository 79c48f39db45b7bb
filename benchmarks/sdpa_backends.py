"""SDPA backends at the attention shapes of the routed steps (bf16, 6 heads of 64, no mask).

Times cuDNN, flash and memory-efficient attention for every benchmark shape at capacities 1,
3/4, 1/2, 1/4 (CUDA events, 30 calls after 5 warm-up calls), to see whether attention over a
routed step's fewer tokens runs as efficiently as over all of them:

    python benchmarks/sdpa_backends.py > benchmarks/results/<gpu>-sdpa-backends.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mormm.bench.models import CAPACITIES, SHAPES

BACKENDS = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
HEADS, HEAD_DIM = 6, 64


def _us(fn, n: int = 30) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


def main() -> None:
    print(f"# SDPA backends: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| shape | batch | tokens | GFLOP | " + " | ".join(f"{b} us" for b in BACKENDS)
          + " | cuDNN TFLOP/s |")
    print("|---|---|---|---|" + "---|" * (len(BACKENDS) + 1))
    for shape in SHAPES.values():
        for c in CAPACITIES:
            L = int(shape.tokens * c)
            q, k, v = (torch.randn(shape.batch, HEADS, L, HEAD_DIM, device="cuda",
                                   dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * shape.batch * HEADS * L * L * HEAD_DIM
            times = {}
            for name, backend in BACKENDS.items():
                with sdpa_kernel(backend):
                    try:
                        times[name] = _us(lambda: F.scaled_dot_product_attention(q, k, v))
                    except RuntimeError:  # no kernel of this backend for the shape
                        times[name] = None
            cells = " | ".join("-" if t is None else f"{t:.1f}" for t in times.values())
            tflops = "-" if times["cuDNN"] is None else f"{flops / times['cuDNN'] / 1e6:.0f}"
            gflop = f"{flops / 1e9:.1f}"
            print(f"| {shape.name} | {shape.batch} | {L} | {gflop} | {cells} | {tflops} |")


if __name__ == "__main__":
    main()
