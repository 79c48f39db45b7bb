"""What `mormm fit`'s per-step depth and router statistics cost a training step, timed in turns.

`MoRModule` logs the depth statistics (`mormm.lit.depth_stats`) and the router's
(`Router.statistics`) on_step in training, and since 3788cc5 computes them only on the steps
Lightning writes (every `log_every_n_steps`). Short clips train bound by the host, where the
statistics' small ops (about 130 for expert-choice at N_r = 4) were paid on every step. This
times the harness's training step (forward, backward, fused AdamW; bf16 autocast) with and
without computing them, in turns, at each shape's batch. Lightning's own `self.log` calls are
not included: this is the ops alone.

    python benchmarks/train_stats.py [--shapes audio1s,image] [--variants vanilla,mor_ec,mor_tc]
        [--json out.json] [--device cpu --small]     # the last two: a smoke test
"""

from __future__ import annotations

import json
from functools import partial

import torch

from mormm.bench.models import (CAPACITIES, DEPTH, VARIANTS, build_model, make_inputs,
                                shape_table, width)
from mormm.bench.timing import autocast, sync, time_alternating
from mormm.lit import depth_stats

import short_args  # benchmarks/, beside this script


def step(model, opt, inputs, device, stats: bool) -> None:
    backbone = model.backbone
    with autocast(device):
        out = backbone(model.tokens(*inputs))
        loss = out.hidden.float().square().mean() + out.aux_loss
        if stats:  # what MoRModule._log_depth computes
            logged = depth_stats(out, backbone.config.num_layers, backbone.plan)
            if backbone.router is not None:
                logged.update(backbone.router.statistics(out.steps, out.valid))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    args = short_args.parser(__doc__, "vanilla,mor_ec,mor_tc").parse_args()
    dev, device_name = short_args.device(args)
    dim, heads = width(args.small)
    rows = {}
    for shape_name in args.shapes.split(","):
        shape = shape_table(args.small)[shape_name]
        inputs = make_inputs(shape, dim, dev)
        fns, keys = [], []
        for v in args.variants.split(","):
            model = build_model(VARIANTS[v], dim, heads, DEPTH, len(CAPACITIES)).to(dev).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
            for stats in (False, True):
                fns.append(partial(step, model, opt, inputs, dev, stats))
                keys.append((v, stats))
        times = time_alternating(fns, dev, 3, args.reps, 5)
        for (v, stats), t in zip(keys, times):
            rows.setdefault(f"{shape_name}/{v}", {})["with" if stats else "without"] = t * 1e3
        del fns
        sync(dev)
    print(f"# Training step with and without the per-step statistics: {device_name}, "
          f"torch {torch.__version__}, in turns\n")
    print("| shape / variant | ms without | ms with | with / without |")
    print("|---|---|---|---|")
    for key, r in rows.items():
        print(f"| {key} | {r['without']:.2f} | {r['with']:.2f} | "
              f"{r['with'] / r['without']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
