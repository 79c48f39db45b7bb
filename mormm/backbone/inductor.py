"""The inductor options mormm compiles the backbone with (MoRModule's `compile`, the benchmarks).

Pointwise autotuning is off unless the mode autotunes everything. Inductor times a few block sizes
for each pointwise kernel on its own and keeps the fastest, and for the MLP's GELU the one it kept
was not the fastest inside the forward: compiled video forward on an H200, last recursion step
(32 x 392 x 1536 elements), 512 elements x 8 warps ran 39 us per layer where its first choice,
1024 x 4, runs 28 us; which step's kernel lost changed from one compile to the next (70-100 us per
forward, benchmarks/results/nvidia-h200-compiled-profile.md). With the first choice every step's
kernel runs at the same rate per element, and the compile takes less time (11 s against 15 s).

Graphs compiled for inference on CUDA issue their kernels from inductor's C++ wrapper instead of
its Python one (`inference_config`). A compiled short clip is bound by the host, not the GPU:
at 1 s audio on H200 hosts an expert-choice forward ran 3.2 ms of kernels and took 3.9-5.6 ms;
with the C++ wrapper 3.4 ms on the host where the Python one took 5.6 (vanilla, whose kernels
take 4.6 ms, 5.74 -> 4.83), images 3.99 -> 3.19 ms; video and 10 s audio, bound by the GPU,
unchanged (benchmarks/README.md). Training keeps the Python wrapper: on torch 2.11 the C++ one
failed to compile the backward ("CudaKernelParamCache not populated").
"""

from __future__ import annotations

import functools
import warnings
from contextlib import AbstractContextManager, nullcontext

import torch


def compile_options(mode: str | None = None) -> dict:
    """torch.compile options for `mode` (None: the default mode): the mode's own inductor
    options, with pointwise autotuning off unless the mode autotunes everything."""
    options = dict(torch._inductor.list_mode_options(mode or "default"))
    if not options.get("max_autotune"):
        options["triton.autotune_pointwise"] = False
    return options


def inference_config(mode: str | None, device: torch.device) -> AbstractContextManager:
    """Inductor settings for the graphs a compiled model builds for inference: enter it around
    its no-grad calls (the first one compiles; grad mode is part of dynamo's guards, so training
    graphs compile apart, without it). On CUDA, the C++ wrapper unless `mode` replays CUDA
    graphs, which already take the host out of the way, or no C++ compiler is found; the CPU
    keeps inductor's defaults."""
    if (device.type != "cuda" or compile_options(mode).get("triton.cudagraphs")
            or not _cxx_compiler_found()):
        return nullcontext()
    return torch._inductor.config.patch(cpp_wrapper=True)


@functools.cache
def _cxx_compiler_found() -> bool:
    """Whether inductor finds the C++ compiler its C++ wrapper needs (Triton alone needs only a
    C compiler); without one, compiled inference keeps the Python wrapper, and says so once."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # inductor's InvalidCxxCompiler, or its API moved
        warnings.warn(f"mormm: no C++ compiler for inductor's C++ wrapper ({type(e).__name__}: "
                      f"{e}); compiled inference keeps the Python wrapper, which is slower on "
                      "short clips. Install g++ (e.g. apt install g++) or name one in CXX.",
                      stacklevel=3)
        return False
    return True
