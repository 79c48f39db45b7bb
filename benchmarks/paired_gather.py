"""A/B: a fused step reads its rows and rotary tables in one Triton launch (`paired`, 3c1792a)
against one launch each (`split`), eager inference, one process, same weights, in turns: the
host's time to issue a forward at batch 1 (9 rounds of 50, median and min) and the full batch's
time (5 warm-up calls, 9 turns of 10, median), vanilla beside them:

    python benchmarks/paired_gather.py audio1s,image   # JSON on stdout's last line
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from host_cost import host_ms  # benchmarks/, the script's folder

from mormm.backbone import fused, recursion
from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, build_model, make_inputs, shape_table, width
from mormm.bench.timing import autocast, time_alternating

PAIRED = recursion._rows_at


def split(stream, rope, where, pick=None, L=1, units=None):
    """The rows and the rotary tables at `where` (composed with `pick`, see
    recursion._rows_at), one gather_rows launch each."""
    if torch.compiler.is_compiling():
        return PAIRED(stream, rope, where, pick, L, units)
    out, _, where = fused.gather_rows(stream, where, None, pick, L)
    return out, None if rope is None else fused.gather_rows(rope, where)[0], where


class Arm:
    """A model whose fused steps read their rows with `rows_at` during its calls."""

    def __init__(self, model, rows_at) -> None:
        self.model, self.rows_at = model, rows_at

    def __call__(self, *inputs):
        recursion._rows_at = self.rows_at
        try:
            return self.model(*inputs)
        finally:
            recursion._rows_at = PAIRED


def run(shape: str, dev: torch.device) -> list[dict]:
    dim, heads = width(small=False)
    arms = {}
    for v in ("vanilla", "mor_ec", "mor_tc"):
        torch.manual_seed(0)
        model = build_model(VARIANTS[v], dim, heads, DEPTH, len(CAPACITIES)).to(dev).eval()
        if v == "vanilla":
            arms[v] = model
        else:
            arms[f"{v}/paired"], arms[f"{v}/split"] = Arm(model, PAIRED), Arm(model, split)
    rows = []
    inputs = make_inputs(shape_table(small=False, batch=1)[shape], dim, dev)
    for arm in arms.values():
        host_ms(arm, inputs, dev, 20)
    times = {k: [] for k in arms}
    for _ in range(9):
        for k, arm in arms.items():
            times[k].append(host_ms(arm, inputs, dev))
    rows += [dict(shape=shape, batch=1, what="host ms", arm=k, median=statistics.median(t),
                  min=min(t)) for k, t in times.items()]

    inputs = make_inputs(shape_table(small=False)[shape], dim, dev)

    def forward(arm):
        with torch.no_grad(), autocast(dev):
            arm(*inputs)

    fns = [lambda arm=arm: forward(arm) for arm in arms.values()]
    rows += [dict(shape=shape, batch=inputs[0].shape[0], what="eager ms", arm=k, median=s * 1e3)
             for k, s in zip(arms, time_alternating(fns, dev, warmup=5, reps=9, inner=10))]
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    dev = torch.device("cuda")
    rows = [r for shape in sys.argv[1].split(",") for r in run(shape, dev)]
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "rows": rows}))


if __name__ == "__main__":
    main()
