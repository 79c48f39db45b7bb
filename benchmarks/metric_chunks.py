"""`mormm test`'s loop with its metrics updated per batch against METRIC_CHUNK batches at a
time (mormm/lit.py), timed in turns in one process.

torchmetrics' multiclass update waits for the device (a bincount sized from the data); per
batch, each wait drains the launch queue the host had filled ahead. The same modules run with
`mormm.lit.METRIC_CHUNK` = 1 (an update per batch, as before ac88b5e) and its default, for each
variant eager and depth-wise, on eval_loop.py's batches (AST-like audio, bf16-mixed):

    python benchmarks/metric_chunks.py [--clips 1:256,10:64] [--reps 3] [--out DIR --name NAME]
        [--device cpu --small]     # the CI smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import eval_loop  # benchmarks/, beside this script
import mormm.lit
from mormm.bench.models import width
from mormm.bench.report import environment

DEFAULT = mormm.lit.METRIC_CHUNK


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", default="1:256,10:64", help="seconds:batch per clip length")
    p.add_argument("--variants", default="vanilla,mor_ec,mor_tc")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="the harness's smoke-test width")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name")
    args = p.parse_args()
    dev = torch.device(args.device)
    precision = "bf16-mixed" if dev.type == "cuda" else "32-true"
    dim, heads = width(args.small)
    rows = []
    for spec in args.clips.split(","):
        seconds, batch = float(spec.split(":")[0]), int(spec.split(":")[1])
        batches = eval_loop._batches(seconds, batch, args.batches, dev)
        runs = {(v, m): eval_loop._module(v, dim, heads, m == "depthwise")
                for v in args.variants.split(",")
                for m in eval_loop.MODES.get(v, ("eager", "depthwise"))}
        keys = [(v, m, c) for v, m in runs for c in (1, DEFAULT)]

        def run(key, limit=None) -> float:
            v, m, chunk = key
            mormm.lit.METRIC_CHUNK = chunk
            return eval_loop._test(runs[v, m], batches, dev, precision, limit)[0]

        for key in keys:  # warm-up
            run(key, limit=6)
        times = {key: [] for key in keys}
        for _ in range(args.reps):  # in turns
            for key in keys:
                times[key].append(run(key))
        mormm.lit.METRIC_CHUNK = DEFAULT
        for (v, m, c), t in times.items():
            rows.append({"clip_s": seconds, "batch": batch, "variant": v, "mode": m, "chunk": c,
                         "ms_per_batch": 1e3 * statistics.median(t) / args.batches,
                         "times_s": t})
        runs.clear()  # free this clip length's models before the next
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    env = environment(dev)
    lines = [f"# `mormm test`'s loop, metrics per batch against {DEFAULT} batches at a time: "
             f"{env['device_name']}, torch {env['torch']}, code {env['code']}, {precision}, "
             f"{args.batches} batches per run, median of {args.reps} runs in turns", "",
             f"| clip | batch | variant | mode | ms / batch, chunk 1 / {DEFAULT} | chunk 1 over "
             f"{DEFAULT} | over vanilla eager, chunk 1 / {DEFAULT} |", "|---|---|---|---|---|---|---|"]
    ms = {(r["clip_s"], r["variant"], r["mode"], r["chunk"]): r["ms_per_batch"] for r in rows}
    for r in rows:
        if r["chunk"] != 1:
            continue
        s, v, m = r["clip_s"], r["variant"], r["mode"]
        one, chunked = ms[s, v, m, 1], ms[s, v, m, DEFAULT]
        over = (f"{ms[s, 'vanilla', 'eager', 1] / one:.2f}x / "
                f"{ms[s, 'vanilla', 'eager', DEFAULT] / chunked:.2f}x"
                if (s, "vanilla", "eager", 1) in ms else "-")
        lines.append(f"| {s:g} s | {r['batch']} | {v} | {m} | {one:.2f} / {chunked:.2f} | "
                     f"{one / chunked:.2f}x | {over} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.name:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text(table)
        (out / f"{args.name}.json").write_text(
            json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
