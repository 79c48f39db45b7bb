"""A/B: a fused step reads its rows and rotary tables in one Triton launch (`paired`, 3c1792a)
against one launch each (`split`), eager inference, one process, same weights, in turns: the
host's time to issue a forward at batch 1 (9 rounds of 50, median and min) and the full batch's
time (5 warm-up calls, 9 turns of 10, median), vanilla beside them:

    python benchmarks/paired_gather.py audio1s,image   # JSON on stdout's last line
"""
import json
import statistics
import sys
import time

import torch
from mormm.backbone import fused, recursion
from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, build_model, make_inputs, shape_table, width
from mormm.bench.timing import autocast, time_alternating

paired = recursion._rows_at

def split(stream, rope, where):
    if torch.compiler.is_compiling():
        return paired(stream, rope, where)
    out, _ = fused.gather_rows(stream, where)
    return out, None if rope is None else fused.gather_rows(rope, where)[0]

class Arm:
    def __init__(self, model, fn): self.model, self.fn = model, fn
    def __call__(self, *a):
        recursion._rows_at = self.fn
        try:
            return self.model(*a)
        finally:
            recursion._rows_at = paired

dev = torch.device("cuda")
dim, heads = width(small=False)
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
for shape in sys.argv[1].split(","):
    mods = {}
    for v in ("vanilla", "mor_ec", "mor_tc"):
        torch.manual_seed(0)
        m = build_model(VARIANTS[v], dim, heads, DEPTH, len(CAPACITIES)).to(dev).eval()
        if v == "vanilla":
            mods[v] = m
        else:
            mods[v + "/paired"] = Arm(m, paired)
            mods[v + "/split"] = Arm(m, split)
    for batch in (1, None):
        inputs = make_inputs(shape_table(small=False, batch=batch)[shape], dim, dev)
        names = list(mods)
        if batch == 1:
            def host_ms(m, n=50):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                with torch.no_grad(), autocast(dev):
                    for _ in range(n): m(*inputs)
                ms = (time.perf_counter() - t0) / n * 1e3
                torch.cuda.synchronize(); return ms
            for m in mods.values(): host_ms(m, 20)
            t = {k: [] for k in names}
            for _ in range(9):
                for k in names: t[k].append(host_ms(mods[k]))
            for k in names:
                row = dict(shape=shape, batch=1, what="host ms", arm=k, median=statistics.median(t[k]), min=min(t[k]))
                res["rows"].append(row); print(row, flush=True)
        else:
            fns = []
            for k in names:
                def f(m=mods[k]):
                    with torch.no_grad(), autocast(dev): m(*inputs)
                fns.append(f)
            ms = time_alternating(fns, dev, warmup=5, reps=9, inner=10)
            for k, s in zip(names, ms):
                row = dict(shape=shape, batch=inputs[0].shape[0], what="eager ms", arm=k, median=s * 1e3)
                res["rows"].append(row); print(row, flush=True)
print(json.dumps(res))
