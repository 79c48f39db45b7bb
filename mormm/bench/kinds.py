"""Kernel time by kind: groups the profiler's kernel names into the parts of a forward (matrix
products, attention, GELU, ...), so "where does a variant lose against vanilla / 1.6" is one
table instead of a list of 150 kernel names.

Names come from three sources, matched by the same patterns: CUDA kernels of eager ops (cuBLAS's
`nvjet_*`, cuDNN's `cudnn_generated_*`, `at::native::*` templates), inductor's Triton kernels
(`triton_poi_fused_gelu_3`: the ops it fused, in its name) and mormm's own Triton kernels
(`_merge_rows`, `_gather_rows`); on the CPU, aten op names (`aten::addmm`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# First match wins, so a fused kernel counts as the costliest op it holds: inductor names a GELU
# kernel that also casts its output `..._gelu_..._to_copy...`, and it is a GELU, not a cast.
KINDS: tuple[tuple[str, str], ...] = (
    ("attention", r"cudnn_generated|flash|fmha|_scaled_dot_product|efficient_attention"),
    ("matmul", r"nvjet|gemm|cutlass|xmma|aten::(addmm|mm|bmm|baddbmm)$"),
    ("gelu", r"gelu"),
    ("layer norm", r"layer_norm"),
    ("rotary apply", r"flip"),  # rotate-half is a flip of the (2, Dh/2) halves (rotary.py)
    ("rotary table", r"\bcos|_cos|\bsin|_sin"),
    ("merge", r"_merge_rows|lerp"),  # gated update of a routed step
    ("top-k", r"topk|sort|radix"),
    # One kind: eager CUDA gathers and scatters launch the same `_scatter_gather_*` kernel.
    ("gather / scatter", r"_gather_rows|index_select|indexselect|gather|scatter|index_put"),
    ("cast", r"fused__to_copy_\d+$|copy_kernel|aten::_to_copy$|aten::copy_$"),
    ("memset / memcpy", r"memset|memcpy|aten::fill_$|aten::zero_$"),
)
_COMPILED = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in KINDS]
OTHER = "other"
# Inductor never computes attention in a Triton kernel (SDPA runs cuDNN's or flash's), but names
# the kernel that lays out SDPA's inputs after the op it feeds too:
# `triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_...` is the rotary apply and
# cast of q, k and v. The attention op is dropped from such names before matching.
_SDPA_CONSUMER = re.compile(r"_scaled_dot_product_\w*?attention_?", re.IGNORECASE)


def kernel_kind(name: str) -> str:
    if name.startswith("triton_"):
        name = _SDPA_CONSUMER.sub("", name)
    for kind, pattern in _COMPILED:
        if pattern.search(name):
            return kind
    return OTHER


def by_kind(kernels: Iterable[tuple[str, float, int]], forwards: int) -> dict[str, tuple[float, float]]:
    """(name, total us, calls) per kernel -> kind: (us per forward, calls per forward), in the
    order of KINDS, then other; kinds that ran nothing are left out."""
    sums = {kind: [0.0, 0] for kind, _ in KINDS} | {OTHER: [0.0, 0]}
    for name, us, calls in kernels:
        entry = sums[kernel_kind(name)]
        entry[0] += us
        entry[1] += calls
    return {kind: (us / forwards, calls / forwards) for kind, (us, calls) in sums.items()
            if us or calls}


def markdown(tables: dict[str, dict[str, tuple[float, float]]], scale: float | None = None) -> str:
    """One row per kind, one column per variant (us per forward, calls in brackets). With `scale`
    (e.g. 1.6, the tokens x layers ratio of vanilla to MoR) a last column compares the second
    variant with the first divided by it: the kinds that fall short of that scaling."""
    names = list(tables)
    kinds = [k for k in [*(kind for kind, _ in KINDS), OTHER] if any(k in t for t in tables.values())]
    head = ["kind", *names]
    compare = scale is not None and len(names) >= 2
    if compare:
        head.append(f"{names[1]} - {names[0]} / {scale:g}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(k, [tables[n].get(k, (0.0, 0.0)) for n in names]) for k in kinds]
    rows.append(("all", [(sum(us for us, _ in t.values()), sum(c for _, c in t.values()))
                         for t in tables.values()]))
    for kind, cells in rows:
        line = [kind, *(f"{us:.1f} ({calls:g})" for us, calls in cells)]
        if compare:
            line.append(f"{cells[1][0] - cells[0][0] / scale:+.1f}")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)
