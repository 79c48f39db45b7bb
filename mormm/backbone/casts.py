"""Shared layers' weights cast to the autocast dtype once per inference forward, not per use.

Under autocast a linear casts its fp32 weight and bias at every call. Autocast caches those
casts for its region, so a layer that a recursive backbone applies N_r times casts them once:
but not under `torch.inference_mode()` (PyTorch turned the cache off there for pytorch#158232),
which is how Lightning runs validate, test and predict, nor in a region opened with
`cache_enabled=False`, as CUDA-graph capture needs. There every use cast again: at N_r = 4 an
expert-choice forward cast its 24 shared tensors 4 times each, 72 launches more than needed
(host time on short clips, and copies on the GPU) where vanilla uses each weight once.

`cast_once(x)`, around MoRBackbone's forward, opens a forward's cache; a `CastOnceLinear`
casts its weight and bias on its first call in it and reuses them. The values are autocast's
own casts (`Tensor.to`), and autocast then leaves the bf16 weights alone, so outputs do not
change. Training keeps autocast's per-use casts (their gradients reach the fp32 weights in
fp32), and compiled graphs take theirs from recursion._linears_cast_once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (dtype, {layer: (weight, bias)}) of the forward in progress; None outside one
_CASTS: ContextVar[tuple[torch.dtype, dict] | None] = ContextVar("mormm_casts", default=None)


@contextmanager
def cast_once(x: Tensor) -> Iterator[None]:
    """Within it, each CastOnceLinear casts its weights once: for an eager inference forward
    on `x` under autocast (grad off; never entered while compiling: dynamo cannot trace the
    ContextVar); elsewhere, or inside an open cache (the outer forward's), it does nothing."""
    device = x.device.type
    if (torch.is_grad_enabled() or not torch.is_autocast_enabled(device)
            or _CASTS.get() is not None):
        yield
        return
    token = _CASTS.set((torch.get_autocast_dtype(device), {}))
    try:
        yield
    finally:
        _CASTS.reset(token)


class CastOnceLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose autocast weights are cast once per
    `cast_once` region."""

    def weights(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) as this call should use them: in a `cast_once` region, in its dtype,
        cast on the first call; elsewhere the parameters."""
        if torch.compiler.is_compiling():  # no cast_once region there (dynamo cannot trace one)
            return self.weight, self.bias
        active = _CASTS.get()
        if active is None or self.weight.dtype != torch.float32:
            return self.weight, self.bias
        dtype, cache = active
        cast = cache.get(self)
        if cast is None:
            cast = cache[self] = (self.weight.to(dtype),
                                  None if self.bias is None else self.bias.to(dtype))
        return cast

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, *self.weights())
