"""Benchmark harness: vanilla vs plain recursive vs Mixture-of-Recursions backbones.

Every variant has the same width and effective depth (DESIGN.md section 3: dim 384, 6 heads,
L = 12; the recursive ones are 3 shared layers x N_r = 4, "cycle" sharing). Inputs are `Tokens`
built directly with random embeddings of the realistic token counts (the tokenizer's cost is
separate), so the harness needs only torch, timm and the backbone.

For each shape x variant x mode (eager, compiled, cudagraphs) it reports inference time and
throughput (clips/s), training step time (forward + backward + AdamW), peak memory of each, and the
FLOPs of a real forward (torch.utils.flop_counter). Against the vanilla row of the same shape and
mode: realised speedup, FLOP-ratio bound (vanilla FLOPs / variant FLOPs) and their ratio.

    python -m mormm.bench.harness --out benchmarks/results          # GPU, all shapes
    python -m mormm.bench.harness --small --device cpu --out /tmp/b # CPU smoke test (seconds)
    mormm bench --config configs/audio/events.yaml --data.batch_size 64   # a config's own model

With --config the shapes and variants are the config's (from_config.py).

The variants of one shape and mode are timed in turns (rep 1 of each, rep 2 of each, ...), so a
drift of the machine during the run does not decide a ratio. Writes <out>/<device-name>.json and
.md after each shape and mode (a run stopped part-way keeps the groups it timed); `merge STEM
a.json b.json` combines calls of one device. No speed is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from argparse import ArgumentError
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from mormm.backbone import compile_options, inference_config
from mormm.backbone.depthwise import DepthwiseBatcher
from mormm.bench.models import (
    CAPACITIES,
    DEPTH,
    SHAPES,
    VARIANTS,
    Shape,
    Suite,
    Variant,
    builtin_suite,
    width,
)
from mormm.bench.report import SCHEMA, add_ratios, environment, markdown, merge, save, slug
from mormm.bench.timing import (
    autocast,
    count_flops,
    cuda_graph,
    host_times,
    inference,
    peak,
    sync,
    time_alternating,
)


MODES = ("eager", "graphed", "compiled", "cudagraphs", "depthwise")


def check_names(parser: argparse.ArgumentParser, flag: str, value: str, known) -> None:
    """A comma list of names on the command line: each must be one of `known` (a usage error
    naming the flag, the unknown names and the choices, not a KeyError deep in the run)."""
    unknown = [x for x in value.split(",") if x and x not in known]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; "
                     f"choose from {','.join(known)}")


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # no such device type, no driver, index too high
        why = str(e).splitlines()[0]
        why = why if len(why) <= 160 else why[:160] + "..."
        parser.error(f"--device {device}: not usable here ({why}); "
                     "--device cpu --small runs the CPU smoke test")


def check_batch(parser: argparse.ArgumentParser, batch: int | None) -> None:
    if batch is not None and batch < 1:
        parser.error(f"--batch {batch}: give at least 1 clip per batch")


# The harness's compiled modes and the torch.compile mode (MoRModule's `compile`) each runs.
COMPILE_MODES = {"compiled": None, "cudagraphs": "reduce-overhead"}


def _compiled(model: nn.Module, mode: str):
    if mode in ("eager", "graphed", "depthwise"):
        return model
    if mode in COMPILE_MODES:  # with the options MoRModule(compile=...) compiles the backbone with
        return torch.compile(model, options=compile_options(COMPILE_MODES[mode]))
    raise ValueError(f"mode={mode!r} is unknown; choose from {', '.join(MODES)}")


def _depthwise(model: nn.Module):
    """The bench model's backbone as a DepthwiseBatcher called like the model: each call admits
    the batch and returns the output of the one admitted N_r - 1 calls before (None while the
    pipeline fills), so calls in a row time the throughput of a stream of batches."""
    batcher = DepthwiseBatcher(model.backbone)

    def call(*inputs):
        return batcher(model.tokens(*inputs))

    return call


@dataclass
class Case:
    """One shape x variant x mode, built and warmed: its row so far and the calls to time."""

    row: dict
    model: nn.Module
    infer: Callable[[], object]  # eval mode
    step: Callable[[], None] | None  # train mode
    host: Callable[[], object] | None = None  # eval mode on a batch of one (eager only)


def prepare(shape: Shape, variant: Variant, mode: str, args, device, inputs,
            build: Callable[[Variant], nn.Module]) -> Case:
    """Build (`build`: the suite's, make_suite), count (FLOPs, kernels), compile or capture, and
    measure peak memory of one case."""
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    model = build(variant).to(device)
    if args.precision == "bf16":  # bf16 weights and residual stream (precision bf16-true)
        model.to(torch.bfloat16)
        inputs = (inputs[0].to(torch.bfloat16), *inputs[1:])
    row = {
        "shape": shape.name,
        "variant": variant.name,
        "mode": mode,
        "precision": args.precision,
        "batch": shape.batch,
        "tokens": shape.tokens,
        "params": sum(p.numel() for p in model.parameters()),
    }
    row["flops"], row["kernels"] = count_flops(model, inputs, device)
    fn_model = _compiled(model, mode)
    # Vanilla has no shared layers to batch: its depthwise row is its eager forward.
    batched = mode == "depthwise" and variant.sharing != "none"
    if batched:
        fn_model = _depthwise(model)
    t0 = time.perf_counter()

    model.eval()

    def forward(batch: tuple, fn):
        # Inference graphs compile as MoRModule's do (inference_config: the C++ wrapper on CUDA).
        config = (inference_config(COMPILE_MODES[mode], device) if mode in COMPILE_MODES
                  else nullcontext())
        with inference(device, cache=mode != "graphed"), config:
            return fn(*batch)

    infer = partial(forward, inputs, fn_model)
    host = None
    if mode in ("eager", "depthwise"):  # one clip: the host's cost, without device back-pressure
        one = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs)
        # batched: a batcher of its own, whose batches in flight are one clip each
        host = partial(forward, one, _depthwise(model) if batched else fn_model)

    if mode == "graphed":  # eager kernels, launched as one CUDA graph (inference only)
        infer = cuda_graph(infer, device)
    for _ in range(len(model.backbone.plan.steps) if batched else 1):
        infer()  # batched: until the pipeline is full, as in a stream's steady state
        if batched:
            host()
    sync(device)
    row["compile_s"] = time.perf_counter() - t0 if mode not in ("eager", "depthwise") else 0.0
    row["infer_peak_gib"] = peak(infer, device, base)

    step = None
    if args.train and (mode == "eager" or (mode not in ("graphed", "depthwise")
                                           and args.compiled_train)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with autocast(device):
                hidden, aux = fn_model(*inputs)
                loss = hidden.float().square().mean() + aux
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # compile + optimizer state, outside the peak measurement
        row["train_peak_gib"] = peak(step, device, base)
    return Case(row, model, infer, step, host)


def measure_group(shape: Shape, cases: list[Case], args, device) -> None:
    """Time the cases of one shape and mode in turns; fills their rows."""
    for case in cases:
        case.model.eval()
    for case, t in zip(cases, time_alternating([c.infer for c in cases], device, args.warmup,
                                               args.reps, args.inner)):
        case.row["infer_s"] = t
        case.row["clips_per_s"] = shape.batch / t
    timed = [c for c in cases if c.host is not None]
    for case, t in zip(timed, host_times([c.host for c in timed], device, args.reps)):
        case.row["host_s"] = t
    trained = [c for c in cases if c.step is not None]
    for case in trained:
        case.model.train()
    steps = time_alternating([c.step for c in trained], device, args.warmup, args.reps,
                             max(1, args.inner // 2))
    for case, t in zip(trained, steps):
        case.row["train_s"] = t


# Options that describe the built-in models and shapes; with --config the config decides them.
BUILTIN_ONLY = ("shapes", "variants", "dim", "heads", "layers", "recursions", "batch", "small")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mormm bench", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="With --config, arguments not listed here (e.g. --data.batch_size 64, "
               "--data.clip_seconds 10) are LightningCLI overrides of the config.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", action="append", default=None,
                   help="a training YAML (repeatable, as for mormm fit): time its backbone "
                        "against vanilla and plain recursion of its width and depth on a batch "
                        "of its data (mormm/bench/from_config.py)")
    p.add_argument("--split", default="val",
                   help="with --config: where that batch comes from, a split of the dataset or "
                        "a media file or folder (data.predict_from; default val)")
    p.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    p.add_argument("--variants", default=None, help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--modes", default="eager,compiled",
                   help="comma list of eager,graphed (CUDA graph of the eager forward),compiled,"
                        "cudagraphs (torch.compile mode reduce-overhead),depthwise (a stream of "
                        "batches, N_r in flight, through DepthwiseBatcher; inference)")
    p.add_argument("--compiled-variants", default=None,
                   help="restrict non-eager modes to these variants (compile time is the cost)")
    p.add_argument("--small", action="store_true", help="tiny shapes and width (CPU smoke test)")
    p.add_argument("--no-train", dest="train", action="store_false")
    p.add_argument("--compiled-train", action="store_true",
                   help="also time training steps in non-eager modes (one more compile each)")
    p.add_argument("--precision", choices=("autocast", "bf16"), default="autocast",
                   help="autocast: fp32 weights under bf16 autocast (CUDA; the training recipe); "
                        "bf16: weights and activations cast to bf16 (Lightning's precision "
                        "bf16-true); needs --no-train")
    p.add_argument("--no-fused-merge", dest="fused_merge", action="store_false",
                   help="routed steps end in the unfused ops (BackboneConfig.fused_merge)")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--batch", type=int, default=None,
                   help="clips per batch for every shape (default: each shape's own, e.g. 32 "
                        "videos; a CPU or a small GPU needs fewer)")
    p.add_argument("--layers", type=int, default=None, help=f"effective depth (default {DEPTH})")
    p.add_argument("--recursions", type=int, default=None,
                   help=f"N_r (default {len(CAPACITIES)})")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--inner", type=int, default=None,
                   help="forwards per timed burst (default 4 on a GPU). A GPU at its power cap "
                        "lowers its clocks within a second or so: short bursts time the boost "
                        "clock, long ones (e.g. 200) the sustained throughput of a long job")
    p.add_argument("--warm-jobs", type=int, default=0,
                   help="compile every non-eager row first in this many parallel processes, so the "
                        "timed pass hits the inductor cache")
    p.add_argument("--budget-s", type=float, default=None, help="skip remaining rows after this")
    p.add_argument("--out", default=None, help="folder for <device>.json and .md")
    p.add_argument("--name", default=None, help="file stem (default: device name)")
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    args.overrides = overrides  # LightningCLI's, with --config
    if args.config is None:
        if args.overrides:
            p.error(f"unrecognized arguments: {' '.join(args.overrides)} (LightningCLI "
                    "overrides need --config)")
        dim, heads = width(args.small)
        defaults = dict(shapes=",".join(SHAPES), variants=",".join(VARIANTS), layers=DEPTH,
                        recursions=len(CAPACITIES), dim=dim, heads=heads)
        for k, v in defaults.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    else:
        given = [f"--{k}" for k in BUILTIN_ONLY if getattr(args, k) not in (None, False)]
        if given:
            p.error(f"{', '.join(given)}: the config decides its model and data (give e.g. "
                    "--data.batch_size N as an override); these options pick the built-in ones")
        if args.warm_jobs:
            p.error("--warm-jobs compiles the built-in rows; with --config leave it out")
    for flag, known in (("--shapes", SHAPES), ("--variants", VARIANTS), ("--modes", MODES)):
        if getattr(args, flag[2:]) is not None:
            check_names(p, flag, getattr(args, flag[2:]), known)
    check_device(p, args.device)
    check_batch(p, args.batch)
    if args.out is not None:  # fail now, not after the first group's compiles and timing
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"--out {args.out}: cannot create the folder ({e.strerror}); give a "
                    "writable folder")
    if args.precision == "bf16" and args.train:
        p.error("--precision bf16 times inference only (bf16 weights are not trained with "
                "AdamW here); add --no-train")
    if args.warmup is None:
        args.warmup = 1 if args.small else 5
    if args.reps is None:
        args.reps = 1 if args.small else 7
    if args.inner is None:
        args.inner = 1 if args.small else 4
    for flag, least in (("warmup", 0), ("reps", 1), ("inner", 1), ("warm_jobs", 0)):
        value = getattr(args, flag)
        if value < least:
            p.error(f"--{flag.replace('_', '-')} {value}: give at least {least}")
    return args


def depthwise_ok(v: Variant) -> bool:
    """Whether the variant has a depthwise row: what DepthwiseBatcher runs (shared layers,
    recursion-wise keys and values), and vanilla, whose row there is its eager forward (no
    shared layers to batch), the baseline the ratios need."""
    return v.sharing == "none" or v.kv_mode == "recursion"


def make_suite(args, device: torch.device) -> Suite:
    """The built-in shapes and variants, or with --config the config's (from_config.py; raises
    ValueError, FileNotFoundError or jsonargparse's ArgumentError for a bad config)."""
    if args.config is None:
        return builtin_suite(args.small, args.batch, args.dim, args.heads, args.layers,
                             args.recursions, args.fused_merge)
    from mormm.bench.from_config import config_suite

    return config_suite(args.config, args.overrides, args.split, args.fused_merge, device)


def _picked(names: str | None, table: dict) -> list:
    return list(table.values()) if names is None else [table[n] for n in names.split(",") if n]


def _plan(args, suite: Suite) -> list[tuple[Shape, Variant, str]]:
    shapes = _picked(args.shapes, suite.shapes)
    variants = _picked(args.variants, suite.variants)
    modes = [m for m in args.modes.split(",") if m]
    restrict = None if args.compiled_variants is None else set(args.compiled_variants.split(","))
    plan = []  # eager rows first: they are cheap, compiled ones pay a compile each
    for m in modes:
        for s in shapes:
            for v in variants:
                if m != "eager" and restrict is not None and v.name not in restrict:
                    continue
                if m == "depthwise" and not depthwise_ok(v):
                    continue
                plan.append((s, v, m))
    return plan


def _warm(argv: list[str], plan, jobs: int) -> None:
    """Compile every non-eager row in parallel subprocesses (fills the inductor cache)."""
    todo = [(s, v, m) for s, v, m in plan if m != "eager"]

    def one(item):
        s, v, m = item
        cmd = [sys.executable, "-m", "mormm.bench.harness", *argv, "--warm-only",
               "--shapes", s.name, "--variants", v.name, "--modes", m, "--warm-jobs", "0"]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def run(args: argparse.Namespace, suite: Suite, on_group=None) -> dict:
    """Every planned row of `suite` (make_suite), timed group by group (one shape and mode);
    `on_group(result)` gets the result so far after each group, so a run stopped part-way keeps
    what it measured."""
    device = torch.device(args.device)
    plan = _plan(args, suite)
    # The variants of one shape and mode are timed in turns (see time_alternating); a compiled
    # model per variant stays alive meanwhile, so allow dynamo that many compiled entries.
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    groups: dict[tuple[str, str], list[tuple[Shape, Variant, str]]] = {}
    for s, v, m in plan:
        groups.setdefault((s.name, m), []).append((s, v, m))
    if args.warm_only:
        # Compile only: kernels autotuned here, beside the other warm-up jobs on the same GPU,
        # would keep configs picked under contention for the timed pass (the inductor cache
        # stores them); unstored, the timed pass tunes them itself on an idle GPU.
        torch._inductor.config.autotune_local_cache = False
        for items in groups.values():
            inputs = suite.inputs(items[0][0], device)
            for s, v, m in items:
                prepare(s, v, m, args, device, inputs, suite.build)
        return {}
    result = {
        "schema": SCHEMA,
        "env": environment(device),
        "model": suite.model,
        "timing": {"warmup": args.warmup, "reps": args.reps, "inner": args.inner},
        "shapes": [asdict(s) | {"tokens": s.tokens} for s in _picked(args.shapes, suite.shapes)],
        "variants": [asdict(v) for v in _picked(args.variants, suite.variants)],
        "rows": [],
        "errors": [],
    }
    start = time.perf_counter()
    for items in groups.values():
        shape = items[0][0]
        inputs = suite.inputs(shape, device)
        cases = []
        for s, v, m in items:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                result["errors"].append(f"{s.name}/{v.name}/{m}: skipped (time budget)")
                continue
            try:
                cases.append(prepare(s, v, m, args, device, inputs, suite.build))
            except Exception as e:  # a failing case is reported, the others still run
                result["errors"].append(f"{s.name}/{v.name}/{m}: {type(e).__name__}: {e}"[:500])
                print("ERROR", result["errors"][-1], file=sys.stderr, flush=True)
        measure_group(shape, cases, args, device)
        for case in cases:
            result["rows"].append(case.row)
            print(json.dumps({k: (round(x, 5) if isinstance(x, float) else x)
                              for k, x in case.row.items()}), flush=True)
        del cases
        torch._dynamo.reset()
        add_ratios(result["rows"])
        if on_group is not None:
            on_group(result)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:  # mormm bench merge OUT_STEM a.json b.json ...
        if len(argv) < 3:
            print("usage: mormm bench merge OUT_STEM a.json [b.json ...] (writes OUT_STEM.json "
                  "and OUT_STEM.md)", file=sys.stderr)
            return 2
        try:
            result = merge(argv[2:])
        except (OSError, ValueError) as e:  # a missing, unreadable or mismatched result file
            print(f"mormm bench merge: {e}", file=sys.stderr)
            return 2
        save(argv[1], result)
        return 0
    args = parse_args(argv)
    try:
        suite = make_suite(args, torch.device(args.device))
    except ArgumentError as e:  # the config's own keys: LightningCLI's message, no usage dump
        print(f"mormm bench --config: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        from mormm.cli import user_error

        return user_error(e)
    if args.warm_jobs > 0 and not args.warm_only:
        t0 = time.perf_counter()
        _warm([a for a in argv], _plan(args, suite), args.warm_jobs)
        print(f"warm-up compile: {time.perf_counter() - t0:.0f} s", flush=True)
    result = run(args, suite, None if args.out is None else partial(write, args))
    if not args.warm_only:
        print(markdown(result))
    return 0


def write(args: argparse.Namespace, result: dict) -> None:
    # parse_args created the folder
    save(Path(args.out) / (args.name or slug(result["env"]["device_name"])), result)


if __name__ == "__main__":
    sys.exit(main())
