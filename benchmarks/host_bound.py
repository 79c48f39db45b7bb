"""Whether a variant's eager inference time is set by the host or by the GPU, per shape.

    python benchmarks/host_bound.py [--shapes audio1s,image] [--variants ...] [--dim 384]
        [--json out.json] [--md out.md]
        [--device cpu --small]     # a smoke test (no CUDA graphs there)

Per variant, at the harness's batch: its eager time run alone (back-to-back forwards after a
warm-up) and in the harness's turns between variants, its time replayed as a CUDA graph (the
GPU's own time: no host in the loop), and the host's time to issue one forward from an idle
device at the full batch and at batch 1. An eager time near the graphed one is the GPU's; one
near the host's issue time, well above the graphed one, is the host's. `alone` against `turns`
checks that the harness's alternation does not itself slow a variant.
"""

from __future__ import annotations

import statistics

import torch

from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, Shape, build_model, make_inputs
from mormm.bench.models import shape_table
from mormm.bench.models import width as default_width
from mormm.bench.report import code_version
from mormm.bench.timing import cuda_graph, host_times, inference, sync, time_alternating, timed

import short_args  # benchmarks/, beside this script

COLUMNS = ("alone", "turns", "graphed", "host", "host_b1")


def _forward(model, inputs, device, cache: bool = True):
    def call():
        with inference(device, cache):
            return model(*inputs)
    return call


def measure(models: dict, shape: Shape, dim: int, device: torch.device, reps: int) -> list[dict]:
    full = make_inputs(shape, dim, device)
    one = make_inputs(Shape(shape.name, 1, shape.grid), dim, device)
    calls = {v: _forward(m, full, device) for v, m in models.items()}
    rows = {v: {"variant": v} for v in models}
    for v, call in calls.items():
        for _ in range(20):
            call()
        sync(device)
        rows[v]["alone"] = statistics.median(timed(call, device, 4) for _ in range(reps))
    turns = time_alternating(list(calls.values()), device, 5, reps, 4)
    issue = host_times(list(calls.values()), device, reps)
    issue_b1 = host_times([_forward(m, one, device) for m in models.values()], device, reps)
    for v, t, h, h1 in zip(models, turns, issue, issue_b1):
        rows[v].update(turns=t, host=h, host_b1=h1, graphed=None)
        if device.type == "cuda":
            # A captured graph must not rely on autocast's weight-cast cache (timing.autocast).
            graph = cuda_graph(_forward(models[v], full, device, cache=False), device)
            rows[v]["graphed"] = statistics.median(timed(graph, device, 4) for _ in range(reps))
    return [{k: (x * 1e3 if isinstance(x, float) else x) for k, x in r.items()}
            for r in rows.values()]


def markdown(result: dict) -> str:
    lines = [f"# Host- or GPU-bound eager inference: {result['device']}, torch {result['torch']}, "
             f"code {result['code']}", "",
             f"dim {result['dim']}, effective depth {DEPTH}, capacities {CAPACITIES}; bf16 "
             "autocast. ms per forward (median): `alone` = back-to-back, run alone; `turns` = in "
             "the harness's turns between variants; `graphed` = replayed as a CUDA graph (the "
             "GPU's own time); `host` / `host_b1` = the host's time to issue one forward from an "
             "idle device, at the batch / at batch 1. x = vanilla's time over the variant's, in "
             "the same column.", ""]
    for shape, rows in result["shapes"].items():
        base = rows[0]
        lines += [f"## {shape}: batch {result['batches'][shape]}", "",
                  "| variant | " + " | ".join(COLUMNS) + " | alone x | graphed x |",
                  "|---|" + "---|" * (len(COLUMNS) + 2)]
        for r in rows:
            cells = ["-" if r[c] is None else f"{r[c]:.2f}" for c in COLUMNS]
            ratio = [("-" if r[c] is None else f"{base[c] / r[c]:.2f}") for c in ("alone", "graphed")]
            lines.append(f"| {r['variant']} | " + " | ".join(cells + ratio) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = short_args.parser(__doc__, "vanilla,recursive,mor_ec,mor_tc")
    p.add_argument("--dim", type=int, default=None,
                   help="width, with dim / 64 heads (default: the harness's)")
    short_args.add_md(p)
    args = p.parse_args()
    device, device_name = short_args.device(args)
    dim, heads = default_width(args.small)
    if args.dim:
        dim, heads = args.dim, args.dim // 64
    names = args.variants.split(",")
    if names[0] != "vanilla":
        p.error(f"--variants must start with vanilla, the baseline of the ratios (got {names[0]})")
    shapes = {s: shape_table(args.small)[s] for s in args.shapes.split(",")}
    result = {"device": device_name, "torch": torch.__version__, "code": code_version(),
              "dim": dim, "batches": {s: shape.batch for s, shape in shapes.items()}, "shapes": {}}
    models = {v: build_model(VARIANTS[v], dim, heads, DEPTH, len(CAPACITIES)).to(device).eval()
              for v in names}
    for s, shape in shapes.items():
        result["shapes"][s] = measure(models, shape, dim, device, args.reps)
    short_args.emit(args, result, markdown(result))


if __name__ == "__main__":
    main()
