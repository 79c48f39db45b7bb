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

import statistics

import eval_loop  # benchmarks/, beside this script
import mormm.lit
from mormm.bench.report import environment

DEFAULT = mormm.lit.METRIC_CHUNK


def main() -> None:
    args = eval_loop.parser(__doc__, reps=3).parse_args()
    dev, precision = eval_loop.device_and_precision(args)
    rows = []
    for seconds, batch, batches, runs in eval_loop.clips(args):
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
    env = environment(dev)
    lines = [f"# `mormm test`'s loop, metrics per batch against {DEFAULT} batches at a time: "
             f"{env['device_name']}, torch {env['torch']}, code {env['code']}, {precision}, "
             f"{args.batches} batches per run, median of {args.reps} runs in turns", "",
             f"| clip | batch | variant | mode | ms / batch, chunk 1 / {DEFAULT} | chunk 1 over "
             f"{DEFAULT} | over vanilla eager, chunk 1 / {DEFAULT} |",
             "|---|---|---|---|---|---|---|"]
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
    eval_loop.emit(args, "\n".join(lines) + "\n", {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
