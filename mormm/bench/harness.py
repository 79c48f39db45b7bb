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

The variants of one shape and mode are timed in turns (rep 1 of each, rep 2 of each, ...), so a
drift of the machine during the run does not decide a ratio. Writes <out>/<device-name>.json and
.md; `merge STEM a.json b.json` combines calls of one device. No speed is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from encoders.tokens import Tokens
from mormm.backbone import (
    BackboneConfig,
    ExpertChoiceRouter,
    MoRBackbone,
    TokenChoiceRouter,
    compile_options,
)

SCHEMA = "mormm.bench/1"


@dataclass(frozen=True)
class Shape:
    """A batch of token streams on a row-major grid; the first grid axis is the segment axis
    (video: tubelet time slices, audio: time steps, images: rows)."""

    name: str
    batch: int
    grid: tuple[int, ...]
    note: str = ""

    @property
    def tokens(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


SHAPES = {
    "video": Shape("video", 32, (8, 14, 14), "16 x 224^2 frames, 2x16x16 tubelets"),
    "audio10s": Shape("audio10s", 64, (101, 12), "10 s AST-like, 128 mel bins"),
    "audio1s": Shape("audio1s", 256, (9, 12), "1 s AST-like"),
    "image": Shape("image", 128, (14, 14), "224^2, 16x16 patches"),
}
SMALL_SHAPES = {
    "video": Shape("video", 2, (4, 4, 4), "tiny"),
    "audio10s": Shape("audio10s", 2, (12, 4), "tiny"),
    "audio1s": Shape("audio1s", 2, (3, 4), "tiny"),
    "image": Shape("image", 2, (4, 4), "tiny"),
}


@dataclass(frozen=True)
class Variant:
    name: str
    sharing: str = "cycle"
    router: str | None = None  # "ec" expert-choice, "tc" token-choice
    kv_mode: str = "recursion"
    unit: str = "token"


VARIANTS = {
    v.name: v
    for v in (
        Variant("vanilla", sharing="none"),
        Variant("recursive"),
        Variant("mor_ec", router="ec"),
        Variant("mor_ec_kvshare", router="ec", kv_mode="shared"),
        Variant("mor_ec_segment", router="ec", unit="segment"),
        Variant("mor_tc", router="tc"),
        Variant("mor_tc_segment", router="tc", unit="segment"),
    )
}
CAPACITIES = [1.0, 0.75, 0.5, 0.25]


def build_model(variant: Variant, dim: int, heads: int, layers: int, recursions: int,
                fused_merge: bool = True) -> nn.Module:
    config = BackboneConfig(
        dim=dim,
        num_heads=heads,
        num_layers=layers,
        num_recursions=recursions,
        sharing=variant.sharing,
        kv_mode=variant.kv_mode,
        fused_merge=fused_merge,
    )
    router = None
    if variant.router == "ec":
        router = ExpertChoiceRouter(CAPACITIES[:recursions], unit=variant.unit)
    elif variant.router == "tc":
        router = TokenChoiceRouter(CAPACITIES[:recursions], unit=variant.unit)
    backbone = MoRBackbone(config, router)
    # Routers start at zero scores (every unit ties; token-choice units would all pick depth 1).
    # A small random spread stands in for a trained router, whose selections and token-choice
    # loads are what the timings should see.
    randomize_router(backbone)
    return _Bench(backbone)


def randomize_router(backbone: MoRBackbone) -> None:
    """Give the router's weights (zero at initialisation) a small random spread, std
    0.1 / sqrt(fan-in), so that selections are decided by scores, not by ties."""
    if backbone.router is not None:
        with torch.no_grad():
            for p in backbone.router.parameters():
                p.normal_(0.0, 0.1 * p.shape[-1] ** -0.5)


class _Bench(nn.Module):
    """Plain-tensor entry point (compiles without a dataclass crossing the graph boundary)."""

    def __init__(self, backbone: MoRBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, emb: Tensor, pos: Tensor, seg: Tensor, num_segments: int, seg_len: int):
        # Grid rows as segments, laid out one after the other as tokenizers do (video time
        # slices, audio windows).
        tokens = Tokens(emb, pos, seg, torch.zeros_like(seg), None, num_segments, seg_len,
                        contiguous_segments=True)
        out = self.backbone(tokens)
        return out.hidden, out.aux_loss


def make_inputs(shape: Shape, dim: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, N = shape.batch, shape.tokens
    emb = torch.randn(B, N, dim, generator=g).to(device)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape.grid]
    pos = torch.cartesian_prod(*axes).reshape(N, len(shape.grid))
    seg = pos[:, 0].long()
    num_segments, seg_len = shape.grid[0], N // shape.grid[0]
    return (
        emb,
        pos.expand(B, N, -1).contiguous().to(device),
        seg.expand(B, N).contiguous().to(device),
        num_segments,
        seg_len,
    )


# ---- timing ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, inner: int) -> float:
    """Seconds per call of `inner` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _time_alternating(fns: list, device: torch.device, warmup: int, reps: int,
                      inner: int) -> list[float]:
    """Median seconds per call of each fn, timed in turns (rep 1 of every fn, then rep 2, ...)
    so that a drift of the host or the GPU over the run (other tenants, clocks) falls on all of
    them alike instead of on whichever rows ran during it. Eager short shapes are bound by the
    host's speed, which varied by up to 2x between runs of this harness on one kind of machine.
    Each turn starts with an untimed call: the first call after another model re-warms what the
    switch evicted (on the H200, eager MoR-EC at 1 s audio timed 11.3 ms per call in turns of 3
    against 6.3 ms run alone), and a deployed model has no neighbour to switch with."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            fn()
            t.append(_timed(fn, device, inner))
    return [statistics.median(t) for t in times]


def _host_times(fns: list, device: torch.device, reps: int) -> list[float]:
    """Median seconds the host takes to issue one call of each fn, from an idle device: its
    Python, dispatch and kernel launches. The fns run a batch of one: with large kernels the
    device's launch queue fills and blocks the host (an eager vanilla video forward took 16 ms to
    issue at batch 32 on the H200), which would measure the device, not the host."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            fn()  # re-warm after the switch, as in _time_alternating
            _sync(device)
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
            _sync(device)
    return [statistics.median(t) for t in times]


def _peak(fn, device: torch.device, base: int) -> float | None:
    """Peak allocated GiB while running fn once, over `base` bytes allocated before this case was
    built (CUDA only): the case's own weights, optimizer state and activations, not those of the
    other variants it alternates with."""
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def _autocast(device: torch.device, cache: bool = True):
    if device.type == "cuda":
        # A captured CUDA graph must not rely on autocast's weight-cast cache (torch.cuda.graph).
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return torch.autocast("cpu", enabled=False)


class _KernelCounter(TorchDispatchMode):
    """Counts the aten ops of a forward that launch work (views and metadata ops excluded): in
    eager mode each is a kernel launch paid on the host, the cost that dominates short shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in ("detach", "lift_fresh"):
            self.ops += 1
        return out


def count_flops(model: nn.Module, inputs, device) -> tuple[int, int]:
    """FLOPs (torch.utils.flop_counter) and launching ops of one inference forward."""
    model.eval()
    with torch.no_grad(), _autocast(device), FlopCounterMode(display=False) as counter:
        with _KernelCounter() as kernels:
            model(*inputs)
    return int(counter.get_total_flops()), kernels.ops


def _graph(fn, device: torch.device):
    """Capture fn (static shapes, no host syncs) in a CUDA graph; returns its replay."""
    if device.type != "cuda":
        raise RuntimeError("mode 'graphed' needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


MODES = ("eager", "graphed", "compiled", "cudagraphs")


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


def _compiled(model: nn.Module, mode: str):
    if mode in ("eager", "graphed"):
        return model
    # The options MoRModule(compile=...) compiles the backbone with.
    if mode == "compiled":
        return torch.compile(model, options=compile_options())
    if mode == "cudagraphs":
        return torch.compile(model, options=compile_options("reduce-overhead"))
    raise ValueError(f"mode={mode!r} is unknown; choose from {', '.join(MODES)}")


@dataclass
class Case:
    """One shape x variant x mode, built and warmed: its row so far and the calls to time."""

    row: dict
    model: nn.Module
    infer: Callable[[], object]  # eval mode
    step: Callable[[], None] | None  # train mode
    host: Callable[[], object] | None = None  # eval mode on a batch of one (eager only)


def prepare(shape: Shape, variant: Variant, mode: str, args, device, inputs) -> Case:
    """Build, count (FLOPs, kernels), compile or capture, and measure peak memory of one case."""
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    model = build_model(variant, args.dim, args.heads, args.layers, args.recursions,
                        args.fused_merge).to(device)
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
    t0 = time.perf_counter()

    model.eval()

    def forward(batch: tuple):
        with torch.no_grad(), _autocast(device, cache=mode != "graphed"):
            return fn_model(*batch)

    infer = partial(forward, inputs)
    host = None
    if mode == "eager":  # the same forward on one clip: its host cost, without device back-pressure
        host = partial(forward, tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs))

    if mode == "graphed":  # eager kernels, launched as one CUDA graph (inference only)
        infer = _graph(infer, device)
    infer()
    _sync(device)
    row["compile_s"] = time.perf_counter() - t0 if mode != "eager" else 0.0
    row["infer_peak_gib"] = _peak(infer, device, base)

    step = None
    if args.train and (mode == "eager" or (mode != "graphed" and args.compiled_train)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with _autocast(device):
                hidden, aux = fn_model(*inputs)
                loss = hidden.float().square().mean() + aux
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # compile + optimizer state, outside the peak measurement
        row["train_peak_gib"] = _peak(step, device, base)
    return Case(row, model, infer, step, host)


def measure_group(shape: Shape, cases: list[Case], args, device) -> None:
    """Time the cases of one shape and mode in turns; fills their rows."""
    for case in cases:
        case.model.eval()
    for case, t in zip(cases, _time_alternating([c.infer for c in cases], device, args.warmup,
                                                args.reps, args.inner)):
        case.row["infer_s"] = t
        case.row["clips_per_s"] = shape.batch / t
    timed = [c for c in cases if c.host is not None]
    for case, t in zip(timed, _host_times([c.host for c in timed], device, args.reps)):
        case.row["host_s"] = t
    trained = [c for c in cases if c.step is not None]
    for case in trained:
        case.model.train()
    steps = _time_alternating([c.step for c in trained], device, args.warmup, args.reps,
                              max(1, args.inner // 2))
    for case, t in zip(trained, steps):
        case.row["train_s"] = t


# ---- reporting ------------------------------------------------------------------------------


def _add_ratios(rows: list[dict]) -> None:
    def key(r):
        return r["shape"], r["mode"], r.get("precision", "autocast")

    base = {key(r): r for r in rows if r["variant"] == "vanilla"}
    for r in rows:
        v = base.get(key(r))
        if v is None:
            continue
        r["speedup"] = v["infer_s"] / r["infer_s"]
        r["flop_bound"] = v["flops"] / r["flops"]
        r["bound_fraction"] = r["speedup"] / r["flop_bound"]
        if "train_s" in r and "train_s" in v:
            r["train_time_ratio"] = r["train_s"] / v["train_s"]
            if r.get("train_peak_gib") and v.get("train_peak_gib"):
                r["train_mem_ratio"] = r["train_peak_gib"] / v["train_peak_gib"]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [
        f"# mormm bench: {env['device_name']}",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}; "
        f"dim {result['model']['dim']}, {result['model']['heads']} heads, effective depth "
        f"{result['model']['layers']}, N_r = {result['model']['recursions']} (cycle), capacities "
        f"{result['model']['capacities']}"
        f"{'' if result['model'].get('fused_merge', True) else ', unfused step merges'}"
        "; precision: "
        f"{'bf16 autocast (fp32 weights)' if env['device'] == 'cuda' else 'fp32'}, unless the "
        "mode says bf16 (bf16 weights and activations, inference only).",
        "",
        "speedup = vanilla time / variant time (inference, same mode); bound = vanilla FLOPs / "
        "variant FLOPs (forward, torch.utils.flop_counter); frac = speedup / bound; host ms = the "
        "host's time to issue one eager forward (timed at batch 1; near infer ms, the row is "
        "host-bound and follows the host's speed); kernels = aten ops that launch work in one "
        "eager forward (counted on the unfused ops: on CUDA, fused step merges launch 10 fewer "
        "per expert-choice forward at N_r = 4); train and mem = training step time and peak "
        "memory over vanilla's.",
        "",
    ]
    for shape in result["shapes"]:
        rows = [r for r in result["rows"] if r["shape"] == shape["name"]]
        if not rows:
            continue
        lines += [
            f"## {shape['name']}: batch {shape['batch']} x {shape['tokens']} tokens ({shape['note']})",
            "",
            "| variant | mode | infer ms | host ms | clips/s | speedup | bound | frac | GFLOP | kernels | train ms | train | peak GiB | mem |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['variant']} | {r['mode']}{' bf16' if r.get('precision') == 'bf16' else ''} "
                f"| {r['infer_s'] * 1e3:.2f} "
                f"| {_fmt(r.get('host_s') and r['host_s'] * 1e3, '.2f')} | {r['clips_per_s']:.0f} "
                f"| {_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('flop_bound'), '.2f')} "
                f"| {_fmt(r.get('bound_fraction'), '.2f')} | {r['flops'] / 1e9:.1f} "
                f"| {_fmt(r.get('kernels'), 'd')} "
                f"| {_fmt(r.get('train_s') and r['train_s'] * 1e3, '.2f')} "
                f"| {_fmt(r.get('train_time_ratio'), '.2f')} "
                f"| {_fmt(r.get('train_peak_gib'), '.2f')} | {_fmt(r.get('train_mem_ratio'), '.2f')} |"
            )
        lines.append("")
    if result.get("errors"):
        lines += ["## errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower() or "device"


# ---- entry points ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mormm bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ",".join(SHAPES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager,graphed (CUDA graph of the eager forward),compiled,cudagraphs "
                        "(torch.compile mode reduce-overhead)")
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
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--recursions", type=int, default=4)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--inner", type=int, default=None)
    p.add_argument("--warm-jobs", type=int, default=0,
                   help="compile every non-eager row first in this many parallel processes, so the "
                        "timed pass hits the inductor cache")
    p.add_argument("--budget-s", type=float, default=None, help="skip remaining rows after this")
    p.add_argument("--out", default=None, help="folder for <device>.json and .md")
    p.add_argument("--name", default=None, help="file stem (default: device name)")
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag, known in (("--shapes", SHAPES), ("--variants", VARIANTS), ("--modes", MODES)):
        check_names(p, flag, getattr(args, flag[2:]), known)
    check_device(p, args.device)
    if args.precision == "bf16" and args.train:
        p.error("--precision bf16 times inference only (bf16 weights are not trained with "
                "AdamW here); add --no-train")
    if args.dim is None:
        args.dim = 32 if args.small else 384
    if args.heads is None:
        args.heads = 2 if args.small else 6
    if args.warmup is None:
        args.warmup = 1 if args.small else 5
    if args.reps is None:
        args.reps = 1 if args.small else 7
    if args.inner is None:
        args.inner = 1 if args.small else 4
    return args


def _plan(args) -> list[tuple[Shape, Variant, str]]:
    table = SMALL_SHAPES if args.small else SHAPES
    shapes = [table[s] for s in args.shapes.split(",") if s]
    variants = [VARIANTS[v] for v in args.variants.split(",") if v]
    modes = [m for m in args.modes.split(",") if m]
    restrict = None if args.compiled_variants is None else set(args.compiled_variants.split(","))
    plan = []  # eager rows first: they are cheap, compiled ones pay a compile each
    for m in modes:
        for s in shapes:
            for v in variants:
                if m != "eager" and restrict is not None and v.name not in restrict:
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


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    plan = _plan(args)
    table = SMALL_SHAPES if args.small else SHAPES
    # The variants of one shape and mode are timed in turns (see _time_alternating); a compiled
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
            inputs = make_inputs(items[0][0], args.dim, device)
            for s, v, m in items:
                prepare(s, v, m, args, device, inputs)
        return {}
    result = {
        "schema": SCHEMA,
        "env": environment(device),
        "model": {
            "dim": args.dim,
            "heads": args.heads,
            "layers": args.layers,
            "recursions": args.recursions,
            "capacities": CAPACITIES[: args.recursions],
            "fused_merge": args.fused_merge,
        },
        "shapes": [asdict(s) | {"tokens": s.tokens} for s in table.values()
                   if s.name in args.shapes.split(",")],
        "variants": [asdict(v) for v in VARIANTS.values() if v.name in args.variants.split(",")],
        "rows": [],
        "errors": [],
    }
    start = time.perf_counter()
    for items in groups.values():
        shape = items[0][0]
        inputs = make_inputs(shape, args.dim, device)
        cases = []
        for s, v, m in items:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                result["errors"].append(f"{s.name}/{v.name}/{m}: skipped (time budget)")
                continue
            try:
                cases.append(prepare(s, v, m, args, device, inputs))
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
    _add_ratios(result["rows"])
    return result


def merge(paths: list[str]) -> dict:
    """Combine result files of one device (e.g. an eager call and a compiled call) into one."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(results[0])
    out["rows"] = [r for res in results for r in res["rows"]]
    out["errors"] = [e for res in results for e in res["errors"]]
    names = {s["name"]: s for res in results for s in res["shapes"]}
    out["shapes"] = list(names.values())
    _add_ratios(out["rows"])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:  # mormm bench merge OUT_STEM a.json b.json ...
        result = merge(argv[2:])
        Path(argv[1] + ".json").write_text(json.dumps(result, indent=1))
        Path(argv[1] + ".md").write_text(markdown(result))
        return 0
    args = parse_args(argv)
    if args.warm_jobs > 0 and not args.warm_only:
        t0 = time.perf_counter()
        _warm([a for a in argv], _plan(args), args.warm_jobs)
        print(f"warm-up compile: {time.perf_counter() - t0:.0f} s", flush=True)
    result = run(args)
    if args.warm_only:
        return 0
    md = markdown(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = args.name or _slug(result["env"]["device_name"])
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
