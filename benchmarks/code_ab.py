"""Eager forwards of two checkouts of mormm, timed in turns in one process.

A change that cuts the host's work per forward shows on eager short clips, which are bound by
the host. The lent hosts differ by up to 2x in speed, and one host drifts by 10 % and more from
one process to the next, so the two codes are loaded side by side into one process (each
model keeps the module objects it was built from) and timed in turns: for each shape and
variant, the wall time per forward at the shape's batch and the host's time to issue a forward
at batch 1 (bf16 autocast, one autocast region per forward, as the harness opens; gradients
off as Lightning's validate, test and predict turn them off, in inference mode, or under
`--no-grad` as the harness did before 33b64dd). Prints a markdown table, B against A.

    python benchmarks/code_ab.py A_DIR B_DIR [--shapes audio1s,image] [--variants ...]
        [--no-grad] [--json out.json] [--device cpu --small]  # the last two: the CI smoke test

A_DIR and B_DIR each hold the `mormm` and `encoders` packages of one code
(`git archive REV mormm encoders | tar -x -C DIR`).
"""

from __future__ import annotations

import importlib
import json
import sys
from functools import partial
from pathlib import Path

import torch

import short_args  # benchmarks/, beside this script


def load(tree: str):
    """mormm.bench.models and mormm.bench.timing of the code in `tree`, freshly imported."""
    if not (Path(tree) / "mormm" / "__init__.py").is_file():
        raise SystemExit(f"code_ab.py: {tree} holds no mormm package; fill it with "
                         f"`git archive REV mormm encoders | tar -x -C {tree}`")
    for name in [n for n in sys.modules if n.split(".")[0] in ("mormm", "encoders")]:
        del sys.modules[name]
    sys.path.insert(0, tree)
    try:
        models = importlib.import_module("mormm.bench.models")
        timing = importlib.import_module("mormm.bench.timing")
    finally:
        sys.path.remove(tree)
    if not Path(models.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"mormm was imported from {models.__file__}, not from {tree}: run "
                           "where no other mormm is importable")
    return models, timing


def main() -> None:
    p = short_args.parser(__doc__, "vanilla,recursive,mor_ec,mor_tc")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--no-grad", action="store_true",
                   help="torch.no_grad instead of torch.inference_mode (where autocast caches "
                        "weight casts: mormm/backbone/casts.py)")
    args = p.parse_args()
    grad_off = torch.no_grad if args.no_grad else torch.inference_mode
    shapes, variants = args.shapes.split(","), args.variants.split(",")
    dev, device_name = short_args.device(args)
    codes = {"A": load(args.a), "B": load(args.b)}
    timing = codes["B"][1]
    result: dict = {}
    for shape_name in shapes:
        fns, hosts, keys = [], [], []
        for code, (models, code_timing) in codes.items():
            shape = models.shape_table(args.small)[shape_name]
            dim, heads = models.width(args.small)
            inputs = models.make_inputs(shape, dim, dev)
            one = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs)
            for v in variants:
                model = models.build_model(models.VARIANTS[v], dim, heads, models.DEPTH,
                                           len(models.CAPACITIES)).to(dev).eval()

                def forward(model, batch, autocast=code_timing.autocast):
                    with grad_off(), autocast(dev):
                        return model(*batch)

                fns.append(partial(forward, model, inputs))
                hosts.append(partial(forward, model, one))
                keys.append((code, v))
        walls = timing.time_alternating(fns, dev, 5, args.reps, 10)
        host = timing.host_times(hosts, dev, 3 * args.reps)
        result[shape_name] = {f"{c}/{v}": {"wall_ms": w * 1e3, "host_ms": h * 1e3}
                              for (c, v), w, h in zip(keys, walls, host)}
        del fns, hosts
        torch.cuda.empty_cache()

    print(f"# {args.a} (A) against {args.b} (B): {device_name}, "
          f"torch {torch.__version__}, {grad_off.__name__}, one process, in turns\n")
    print("| shape | variant | host ms at batch 1, A / B | wall ms at the shape's batch, A / B "
          "| B / A wall | speedup over vanilla, A / B |")
    print("|---|---|---|---|---|---|")
    for s, rows in result.items():
        for v in variants:
            a, b = rows[f"A/{v}"], rows[f"B/{v}"]
            speed = "-"
            if "vanilla" in variants:
                speed = " / ".join(
                    f"{rows[f'{c}/vanilla']['wall_ms'] / rows[f'{c}/{v}']['wall_ms']:.2f}x"
                    for c in "AB")
            print(f"| {s} | {v} | {a['host_ms']:.2f} / {b['host_ms']:.2f} | {a['wall_ms']:.2f} / "
                  f"{b['wall_ms']:.2f} | {b['wall_ms'] / a['wall_ms']:.3f} | {speed} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": args.a, "b": args.b, "device": device_name, "grad": grad_off.__name__,
                       "torch": torch.__version__, "rows": result}, f, indent=1)


if __name__ == "__main__":
    main()
