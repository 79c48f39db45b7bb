"""Attention over routed slots with per-row prefix padding: masked SDPA vs flash varlen (CUDA).

A routed step that may hold padding slots (token-choice, padded clips, segments) lays out the
taken tokens first in every row. This times the three ways to attend over them at the routed
shapes (6 heads of 64, bf16), and checks varlen against the masked result on the taken slots:

    masked  SDPA with a (B, 1, 1, K) bool key mask (cuDNN picks a masked kernel)
    plain   SDPA without a mask (the exact path's speed, the floor)
    varlen  aten flash attention, each row two sequences: taken slots, padding (PrefixKeys)

    python benchmarks/prefix_attention.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mormm.backbone.layers import PrefixKeys, _varlen_attention
from mormm.bench.timing import timed

SHAPES = [(32, 1176), (32, 784), (32, 392), (128, 147), (128, 49), (64, 909), (64, 303)]
HEADS, HEAD_DIM = 6, 64


def _ms(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    return timed(fn, torch.device("cuda"), n) * 1e3


def one(B: int, K: int) -> dict:
    q, k, v = (torch.randn(B, HEADS, K, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    taken = torch.randint(int(0.8 * K), K + 1, (B,), device="cuda")
    taken[0], taken[1] = K, 0  # a full row and an empty one
    mask = torch.arange(K, device="cuda")[None] < taken[:, None]
    keys = PrefixKeys.of(mask)
    tokens_first = [t.transpose(1, 2).contiguous() for t in (q, k, v)]  # (B, K, H, Dh), as steps

    def masked():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])

    def plain():
        return F.scaled_dot_product_attention(q, k, v)

    def varlen():  # what a routed step runs (mormm.backbone.layers)
        return _varlen_attention(*tokens_first, keys.cu_seqlens, K)

    ref = masked().transpose(1, 2)[mask].float()
    out = varlen()[mask].float()
    return {"batch": B, "slots": K, "rel_err": ((out - ref).norm() / ref.norm()).item(),
            **{f"{name}_ms": _ms(fn) for name, fn in
               (("masked", masked), ("plain", plain), ("varlen", varlen))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for <gpu>-prefix-attention.json and .md")
    args = p.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = [one(B, K) for B, K in SHAPES]
    lines = [f"# Prefix-padded attention: {gpu}", "",
             f"torch {torch.__version__}; {HEADS} heads of {HEAD_DIM}, bf16; 80-100 % of each "
             "row's slots taken (one row full, one empty); ms per call.", "",
             "| B x K slots | masked SDPA | varlen | no mask | masked / varlen | varlen rel. err |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} x {r['slots']} | {r['masked_ms']:.3f} | {r['varlen_ms']:.3f} "
                     f"| {r['plain_ms']:.3f} | {r['masked_ms'] / r['varlen_ms']:.2f} "
                     f"| {r['rel_err']:.1e} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        stem = Path(args.out) / ("".join(c if c.isalnum() else "-" for c in gpu).lower()
                                 + "-prefix-attention")
        stem.with_suffix(".json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__,
                                                          "rows": rows}, indent=1))
        stem.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
