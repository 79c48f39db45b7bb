"""What `mormm test` runs, with and without model.depthwise: clips per second of Lightning's test
loop over a stream of audio clips, timed in turns.

The harness times the backbone on random tokens; this times a user's evaluation: the batch's copy
to the device, the log-mel frontend and patch embedding (AudioTokenizer, AST-like 16 x 16
patches, 128 mel bins), the backbone, the head, the task loss, the torchmetrics updates and the
epoch's logging of `MoRModule`'s test loop, under Lightning's bf16-mixed precision. The clock runs
from the test epoch's start to the loop's end (Trainer set-up left out), the batches come from
pinned host memory in the main process (no decoding), and a last run of each checks that the
depth-wise run logged the batch-by-batch run's metrics. `--no-stats` leaves the depth and router
statistics out (what they cost the loop).

    python benchmarks/eval_loop.py [--clips 1:256,10:64] [--variants vanilla,mor_ec,mor_tc]
        [--batches 40] [--reps 5] [--no-stats] [--out DIR --name NAME] [--device cpu --small]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch

from encoders import AudioTokenizer
from mormm.bench.models import CAPACITIES, DEPTH, VARIANTS, build_model, width
from mormm.bench.report import environment
from mormm.bench.timing import sync
from mormm.lit import MoRModule

CLASSES = 50
MODES = {"vanilla": ("eager",)}  # vanilla shares no layers: the pipeline cannot take it


class _EpochClock(L.Callback):
    """Seconds from the test epoch's start to the loop's end, the device idle at both.

    It stops at on_test_end, not on_test_epoch_end: Lightning calls callbacks' epoch-end hooks
    before the module's, and the module's is where the depth-wise batches still in flight finish
    and the epoch's metrics are computed and logged."""

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.start = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.stop = time.perf_counter()
        self.seconds = self.stop - self.start


def _module(variant: str, dim: int, heads: int, depthwise: bool) -> MoRModule:
    torch.manual_seed(0)
    backbone = build_model(VARIANTS[variant], dim, heads, DEPTH, len(CAPACITIES)).backbone
    return MoRModule(AudioTokenizer(dim=dim), backbone, num_classes=CLASSES,
                     depthwise=depthwise)


def _batches(seconds: float, batch: int, count: int, device: torch.device) -> list[dict]:
    """`count` batches of `batch` clips (random audio and labels; 8 distinct ones, repeated)."""
    g = torch.Generator().manual_seed(0)
    pin = device.type == "cuda"
    distinct = []
    for _ in range(min(8, count)):
        audio = torch.randn(batch, int(16000 * seconds), generator=g)
        label = torch.randint(0, CLASSES, (batch,), generator=g)
        distinct.append({"audio": audio.pin_memory() if pin else audio,
                         "label": label.pin_memory() if pin else label})
    return [distinct[i % len(distinct)] for i in range(count)]


def _test(module: MoRModule, batches: list[dict], device: torch.device, precision: str,
          limit: int | None = None) -> tuple[float, dict]:
    clock = _EpochClock()
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[clock], limit_test_batches=limit)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    (metrics,) = trainer.test(module, loader, verbose=False)
    return clock.seconds, {k: float(v) for k, v in metrics.items()}


def parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """The options of a script that times this loop (this one, metric_chunks.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--clips", default="1:256,10:64", help="seconds:batch per clip length")
    p.add_argument("--variants", default="vanilla,mor_ec,mor_tc")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="the harness's smoke-test width")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name")
    return p


def device_and_precision(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The device --device names and the Lightning precision the loop runs under there."""
    dev = torch.device(args.device)
    return dev, "bf16-mixed" if dev.type == "cuda" else "32-true"


def clips(args: argparse.Namespace) -> Iterator[tuple[float, int, list[dict], dict]]:
    """Per clip length of --clips: its seconds, batch size, batches and a module per variant
    and mode, {(variant, mode): MoRModule} (vanilla eager only, the others eager and
    depth-wise)."""
    dev, _ = device_and_precision(args)
    dim, heads = width(args.small)
    for spec in args.clips.split(","):
        seconds, batch = float(spec.split(":")[0]), int(spec.split(":")[1])
        runs = {(v, m): _module(v, dim, heads, m == "depthwise")
                for v in args.variants.split(",") for m in MODES.get(v, ("eager", "depthwise"))}
        yield seconds, batch, _batches(seconds, batch, args.batches, dev), runs
        runs.clear()  # this clip length's models, before the next one's
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def emit(args: argparse.Namespace, table: str, result: dict) -> None:
    """Print the table; with --name, write it and the result (JSON) under --out."""
    print(table)
    if args.name:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text(table)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    p = parser(__doc__, reps=5)
    p.add_argument("--no-stats", action="store_true", help="no depth or router statistics")
    args = p.parse_args()
    if args.no_stats:
        MoRModule._statistics = lambda self, out: {}
    dev, precision = device_and_precision(args)
    rows = []
    for seconds, batch, batches, runs in clips(args):
        for module in runs.values():  # warm-up: kernels compiled and tuned, allocator grown
            _test(module, batches, dev, precision, limit=6)
        times = {key: [] for key in runs}
        logged = {}
        for _ in range(args.reps):  # in turns: a drift of the host falls on every row alike
            for key, module in runs.items():
                times[key].append(_test(module, batches, dev, precision)[0])
        for key, module in runs.items():
            logged[key] = _test(module, batches, dev, precision, limit=8)[1]
        vanilla = times.get(("vanilla", "eager"))
        base = None if vanilla is None else statistics.median(vanilla)
        for (v, m), t in times.items():
            s = statistics.median(t)
            eager = logged.get((v, "eager"))
            diff = (None if m == "eager" or eager is None else
                    max(abs(logged[v, m][k] - eager[k]) for k in eager))
            rows.append({"clip_s": seconds, "batch": batch, "variant": v, "mode": m,
                         "ms_per_batch": 1e3 * s / args.batches,
                         "clips_per_s": batch * args.batches / s,
                         "over_vanilla": None if base is None else base / s,
                         "times_s": t, "max_logged_diff": diff})
    env = environment(dev)
    lines = [f"# `mormm test`'s loop, eager against model.depthwise: {env['device_name']}, "
             f"torch {env['torch']}, code {env['code']}, {precision}, {args.batches} batches "
             f"per run, median of {args.reps} runs in turns"
             + (", no depth or router statistics" if args.no_stats else ""), "",
             "| clip | batch | variant | mode | ms / batch | clips/s | over vanilla eager "
             "| max logged diff vs eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        over = "-" if r["over_vanilla"] is None else f"{r['over_vanilla']:.2f}x"
        diff = "-" if r["max_logged_diff"] is None else f"{r['max_logged_diff']:.1e}"
        lines.append(f"| {r['clip_s']:g} s | {r['batch']} | {r['variant']} | {r['mode']} | "
                     f"{r['ms_per_batch']:.2f} | {r['clips_per_s']:.0f} | {over} | {diff} |")
    emit(args, "\n".join(lines) + "\n",
         {"environment": env, "statistics": not args.no_stats, "rows": rows})


if __name__ == "__main__":
    main()
