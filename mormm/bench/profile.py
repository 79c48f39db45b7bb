"""Kernel-time breakdown of one benchmark row (torch.profiler), to find where a variant's time goes.

    python -m mormm.bench.profile --shape video --variants vanilla,mor_ec [--train] [--compiled]
        [--pointwise-autotune] [--by-kind]
    python -m mormm.bench.profile --device cpu --small --shape audio1s --by-kind   # no GPU

Prints the profiler's kernel table per variant; with --by-kind also one table of kernel time per
forward grouped by kind (mormm/bench/kinds.py) with all variants side by side, and a column
comparing the second variant with the first scaled by --scale.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from contextlib import nullcontext

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mormm.backbone import compile_options, inference_config
from mormm.bench import kinds
from mormm.bench.harness import check_batch, check_device, check_names
from mormm.bench.models import (
    CAPACITIES,
    DEPTH,
    SHAPES,
    VARIANTS,
    build_model,
    make_inputs,
    shape_table,
    width,
)
from mormm.bench.timing import autocast, sync

ITERATIONS = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mormm.bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="video", help="one of " + ",".join(SHAPES))
    p.add_argument("--variants", default="vanilla,mor_ec", help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--small", action="store_true", help="the harness's tiny shapes and width")
    p.add_argument("--batch", type=int, default=None, help="clips per batch (default: the shape's)")
    p.add_argument("--train", action="store_true")
    p.add_argument("--top", type=int, default=12, help="rows of each variant's kernel table")
    p.add_argument("--compiled", action="store_true", help="profile the torch.compile'd model")
    p.add_argument("--pointwise-autotune", action="store_true",
                   help="compiled with inductor's pointwise autotuning on, its own default "
                        "(mormm turns it off: mormm/backbone/inductor.py)")
    p.add_argument("--no-fused-merge", dest="fused_merge", action="store_false",
                   help="routed steps end in the unfused ops (BackboneConfig.fused_merge)")
    p.add_argument("--by-kind", action="store_true",
                   help="also print kernel time per forward by kind, the variants side by side")
    p.add_argument("--scale", type=float,
                   default=len(CAPACITIES) / sum(CAPACITIES),
                   help="compare the second variant with the first divided by this (default: "
                        "tokens x layers of vanilla over MoR at the harness's capacities, 1.6)")
    args = p.parse_args(argv)
    check_names(p, "--shape", args.shape, SHAPES)
    if "," in args.shape:
        p.error(f"--shape {args.shape}: one shape per run")
    check_names(p, "--variants", args.variants, VARIANTS)
    check_device(p, args.device)
    check_batch(p, args.batch)
    return args


def _kernels(prof, device: torch.device) -> list[tuple[str, float, int]]:
    """(name, self time in us, calls) of what ran on the device: CUDA kernels, or on the CPU the
    aten ops. CPU ops nest (aten::layer_norm calls aten::native_layer_norm): time is self time,
    and an op that calls one of its own kind only wraps it, so its calls are counted there. The
    rule reads the call tree: one by time (wrappers spend little time in themselves) miscounted
    on a loaded CI machine."""
    if device.type == "cuda":
        return [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                if e.device_type == DeviceType.CUDA]
    wrappers = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CPU and any(
        kinds.kernel_kind(c.name) == kinds.kernel_kind(e.name) for c in e.cpu_children))
    return [(e.key, e.self_cpu_time_total, e.count - wrappers[e.key])
            for e in prof.key_averages()]


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    shape = shape_table(args.small, args.batch)[args.shape]
    dim, heads = width(args.small)
    options = compile_options()
    if args.pointwise_autotune:
        del options["triton.autotune_pointwise"]
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    tables = {}
    for name in args.variants.split(","):
        model = build_model(VARIANTS[name], dim, heads, DEPTH, len(CAPACITIES),
                            args.fused_merge).to(device)
        run = torch.compile(model, options=options) if args.compiled else model
        inputs = make_inputs(shape, dim, device)
        model.train(args.train)
        opt = torch.optim.AdamW(model.parameters(), fused=device.type == "cuda")

        def once():
            # Compiled inference as MoRModule runs it (inference_config: the C++ wrapper on CUDA).
            config = (inference_config(None, device) if args.compiled and not args.train
                      else nullcontext())
            with torch.set_grad_enabled(args.train), autocast(device), config:
                hidden, aux = run(*inputs)
                loss = hidden.float().square().mean() + aux
            if args.train:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        for _ in range(3):
            once()
        sync(device)
        with profile(activities=[activity]) as prof:
            for _ in range(ITERATIONS):
                once()
            sync(device)
        mode = "compiled" if args.compiled else "eager"
        print(f"== {shape.name} {name} {mode} {'train' if args.train else 'infer'} "
              f"({ITERATIONS} iterations)")
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top,
                                        max_name_column_width=60))
        tables[name] = kinds.by_kind(_kernels(prof, device), ITERATIONS)
    if args.by_kind:
        step = "training step" if args.train else "forward"
        print(f"\n== {shape.name}, kernel time by kind, us per {step} (calls per {step})")
        print(kinds.markdown(tables, args.scale))
    return tables


if __name__ == "__main__":
    main()
