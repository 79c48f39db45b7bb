"""The inductor options mormm compiles the backbone with (MoRModule's `compile`, the benchmarks).

Pointwise autotuning is off unless the mode autotunes everything. Inductor times a few block sizes
for each pointwise kernel on its own and keeps the fastest, and for the MLP's GELU the one it kept
was not the fastest inside the forward: compiled video forward on an H200, last recursion step
(32 x 392 x 1536 elements), 512 elements x 8 warps ran 39 us per layer where its first choice,
1024 x 4, runs 28 us; which step's kernel lost changed from one compile to the next (70-100 us per
forward, benchmarks/results/nvidia-h200-compiled-profile.md). With the first choice every step's
kernel runs at the same rate per element, and the compile takes less time (11 s against 15 s).
"""

from __future__ import annotations

import torch


def compile_options(mode: str | None = None) -> dict:
    """torch.compile options for `mode` (None: the default mode): the mode's own inductor
    options, with pointwise autotuning off unless the mode autotunes everything."""
    options = dict(torch._inductor.list_mode_options(mode or "default"))
    if not options.get("max_autotune"):
        options["triton.autotune_pointwise"] = False
    return options
