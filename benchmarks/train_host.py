"""Where an eager training step's host time goes: forward, backward and optimizer step issued
back to back with no sync between them, each phase timed on the host.

    python benchmarks/train_host.py [--shapes audio1s,image] [--variants vanilla,mor_ec,mor_tc]
        [--dim 384 --heads 6] [--json out.json] [--md out.md]
        [--device cpu --small]     # a smoke test

Each step starts from an idle device. A phase's host ms is the time the host took to issue its
kernels (on the CPU: to run them). `tail` is what the device still had queued once the host had
issued the whole step: near 0, the step ran at the host's pace (a GPU that finishes a kernel
early waits for the next launch); well above 0, at the kernels'. MoR's weight sharing shows in
the backward: autograd sums each shared parameter's gradients over its uses, one launch per
extra use, before it accumulates them (benchmarks/README.md).
"""

from __future__ import annotations

import statistics
import time

import torch

from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, build_model, make_inputs, shape_table
from mormm.bench.models import width as default_width
from mormm.bench.report import code_version
from mormm.bench.timing import autocast, sync

import short_args  # benchmarks/, beside this script

PHASES = ("forward", "backward", "optimizer", "tail", "step")


def phases(model, inputs, opt, device: torch.device, reps: int) -> dict[str, float]:
    """Median ms per phase over `reps` training steps, each from an idle device."""
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            hidden, aux = model(*inputs)
            loss = hidden.float().square().mean() + aux
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        sync(device)
        t4 = time.perf_counter()
        for p, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            times[p].append(dt * 1e3)
    return {p: statistics.median(v) for p, v in times.items()}


def markdown(result: dict) -> str:
    lines = [f"# Host time per phase of an eager training step: {result['device']}, torch "
             f"{result['torch']}, code {result['code']}", "",
             "ms, median over the steps; `tail` = the device's queue left when the host had "
             "issued the step (near 0: host-bound).", "",
             "| shape | variant | dim | " + " | ".join(PHASES) + " |",
             "|---|---|---|" + "---|" * len(PHASES)]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['variant']} | {r['dim']} | "
                     + " | ".join(f"{r[p]:.2f}" for p in PHASES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = short_args.parser(__doc__, "vanilla,mor_ec,mor_tc")
    p.add_argument("--dim", type=int, default=None, help="width (default: the harness's)")
    p.add_argument("--heads", type=int, default=None)
    short_args.add_md(p)
    args = p.parse_args()
    device, device_name = short_args.device(args)
    dim, heads = default_width(args.small)
    dim, heads = args.dim or dim, args.heads or heads
    rows = []
    for shape_name in args.shapes.split(","):
        shape = shape_table(args.small)[shape_name]
        inputs = make_inputs(shape, dim, device)
        for name in args.variants.split(","):
            model = build_model(VARIANTS[name], dim, heads, DEPTH, len(CAPACITIES)).to(device)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            phases(model, inputs, opt, device, 5)  # optimizer state, cuBLAS plans
            rows.append({"shape": shape_name, "variant": name, "dim": dim,
                         **phases(model, inputs, opt, device, args.reps)})
            del model, opt
    result = {"device": device_name, "torch": torch.__version__, "code": code_version(),
              "rows": rows}
    short_args.emit(args, result, markdown(result))


if __name__ == "__main__":
    main()
