"""Kernel-time breakdown of one benchmark row (torch.profiler), to find where a variant's time goes.

    python -m mormm.bench.profile --shape video --variants vanilla,mor_ec [--train] [--compiled]
        [--pointwise-autotune]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from mormm.backbone import compile_options
from mormm.bench.harness import SHAPES, VARIANTS, _autocast, build_model, make_inputs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mormm.bench.profile")
    p.add_argument("--shape", default="video")
    p.add_argument("--variants", default="vanilla,mor_ec")
    p.add_argument("--train", action="store_true")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--compiled", action="store_true", help="profile the torch.compile'd model")
    p.add_argument("--pointwise-autotune", action="store_true",
                   help="compiled with inductor's pointwise autotuning on, its own default "
                        "(mormm turns it off: mormm/backbone/inductor.py)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda")
    shape = SHAPES[args.shape]
    options = compile_options()
    if args.pointwise_autotune:
        del options["triton.autotune_pointwise"]
    for name in args.variants.split(","):
        model = build_model(VARIANTS[name], 384, 6, 12, 4).to(device)
        run = torch.compile(model, options=options) if args.compiled else model
        inputs = make_inputs(shape, 384, device)
        model.train(args.train)
        opt = torch.optim.AdamW(model.parameters(), fused=True)

        def once():
            with torch.set_grad_enabled(args.train), _autocast(device):
                hidden, aux = run(*inputs)
                loss = hidden.float().square().mean() + aux
            if args.train:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        for _ in range(3):
            once()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                once()
            torch.cuda.synchronize()
        mode = "compiled" if args.compiled else "eager"
        print(f"== {shape.name} {name} {mode} {'train' if args.train else 'infer'} (3 iterations)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top,
                                        max_name_column_width=60))


if __name__ == "__main__":
    main()
