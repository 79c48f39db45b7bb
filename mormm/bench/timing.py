"""How the harness measures: device time per call (CUDA events), the host's time to issue a call,
peak memory, FLOPs and launching ops of a forward, and the CUDA graph of an eager forward."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, inner: int) -> float:
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


def time_alternating(fns: list, device: torch.device, warmup: int, reps: int,
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
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            fn()
            t.append(timed(fn, device, inner))
    return [statistics.median(t) for t in times]


def host_times(fns: list, device: torch.device, reps: int) -> list[float]:
    """Median seconds the host takes to issue one call of each fn, from an idle device: its
    Python, dispatch and kernel launches. The fns run a batch of one: with large kernels the
    device's launch queue fills and blocks the host (an eager vanilla video forward took 16 ms to
    issue at batch 32 on the H200), which would measure the device, not the host."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            fn()  # re-warm after the switch, as in time_alternating
            sync(device)
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
            sync(device)
    return [statistics.median(t) for t in times]


def peak(fn, device: torch.device, base: int) -> float | None:
    """Peak allocated GiB while running fn once, over `base` bytes allocated before this case was
    built (CUDA only): the case's own weights, optimizer state and activations, not those of the
    other variants it alternates with."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


@contextmanager
def inference(device: torch.device, cache: bool = True) -> Iterator[None]:
    """What inference is timed under: torch.inference_mode, as Lightning's validate, test and
    predict run the model, and autocast. Autocast caches no weight casts in inference mode
    (mormm/backbone/casts.py casts the shared layers' once per forward), so no_grad would time
    a path users do not take."""
    with torch.inference_mode(), autocast(device, cache):
        yield


def autocast(device: torch.device, cache: bool = True):
    if device.type == "cuda":
        # A captured CUDA graph must not rely on autocast's weight-cast cache (torch.cuda.graph).
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return torch.autocast("cpu", enabled=False)


class KernelCounter(TorchDispatchMode):
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
    with torch.no_grad(), autocast(device), FlopCounterMode(display=False) as counter:
        with KernelCounter() as kernels:
            model(*inputs)
    return int(counter.get_total_flops()), kernels.ops


def cuda_graph(fn, device: torch.device):
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
