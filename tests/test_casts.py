"""Shared weights are cast to the autocast dtype once per inference forward (casts.py), in the
inference mode Lightning evaluates and predicts in, where autocast's own cache is off."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import on_device, random_tokens, randomize_router
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone, TokenChoiceRouter
from mormm.backbone.casts import CastOnceLinear, cast_once

DIM, HEADS, B, N, R = 32, 4, 2, 24, 4
CAPS = [1.0, 0.75, 0.5, 0.25]
CASTS = {"to.dtype", "_to_copy.default", "to.dtype_layout"}

pytestmark = pytest.mark.usefixtures("one_thread")
# CUDA: the fused Triton merges and varlen attention of eager inference, under CUDA's autocast.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA autocast and the fused path need a GPU"))]


class ParameterCasts(TorchDispatchMode):
    """How often each parameter (by storage) is cast in the ops it watches."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.names = {p.data_ptr(): n for n, p in model.named_parameters()}
        self.count: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._opname + "." + func._overloadname in CASTS:
            name = self.names.get(args[0].data_ptr())
            if name is not None:
                self.count[name] += 1
        return func(*args, **(kwargs or {}))


def build(router=None, sharing="cycle", kv_mode="recursion", L=R):
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=L, num_recursions=R,
                         sharing=sharing, rope_axes=2, kv_mode=kv_mode)
    model = MoRBackbone(cfg, router).eval()
    if router is not None:
        randomize_router(model)
    return model


def forward(model, tokens, grad_mode):
    device = tokens.embeddings.device.type
    with grad_mode(), torch.autocast(device, dtype=torch.bfloat16):
        out = model(tokens)
        return out.hidden, out.depth


MODELS = {
    "expert_choice": lambda: build(ExpertChoiceRouter(capacities=CAPS)),
    "token_choice": lambda: build(TokenChoiceRouter(capacities=CAPS)),
    "recursive": lambda: build(),
    "shared_kv": lambda: build(ExpertChoiceRouter(capacities=CAPS), kv_mode="shared"),
    "middle_cycle": lambda: build(ExpertChoiceRouter(capacities=CAPS), "middle_cycle", L=6),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("lengths", [None, [24, 13]], ids=["unpadded", "padded"])
@pytest.mark.parametrize("device", DEVICES)
def test_each_weight_is_cast_once_per_inference_forward(name, lengths, device):
    model = MODELS[name]().to(device)
    tokens = on_device(random_tokens(B, N, DIM, lengths), device)
    linears = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, CastOnceLinear)
               for k, _ in m.named_parameters()}
    with ParameterCasts(model) as casts:
        forward(model, tokens, torch.inference_mode)
    assert set(casts.count) == linears  # every shared linear's weight and bias ...
    assert set(casts.count.values()) == {1}  # ... once, not at each of the N_r steps
    # The second forward casts afresh: the weights may have changed in between.
    with ParameterCasts(model) as again:
        forward(model, tokens, torch.inference_mode)
    assert again.count == casts.count


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("lengths", [None, [24, 13]], ids=["unpadded", "padded"])
@pytest.mark.parametrize("device", DEVICES)
def test_outputs_are_autocasts_own(name, lengths, device):
    """Inference mode with the forward's casts gives what autocast computes with its cache
    (no_grad), bit for bit: the same casts of the same weights."""
    model = MODELS[name]().to(device)
    tokens = on_device(random_tokens(B, N, DIM, lengths), device)
    hidden, depth = forward(model, tokens, torch.inference_mode)
    ref_hidden, ref_depth = forward(model, tokens, torch.no_grad)
    assert torch.equal(depth, ref_depth)
    assert torch.equal(hidden, ref_hidden)


def test_training_and_plain_precision_keep_the_parameters():
    layer = CastOnceLinear(4, 4)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), cast_once(x):  # grad on: training
        assert layer.weights()[0] is layer.weight
    with torch.inference_mode(), cast_once(x):  # no autocast: nothing to cast
        assert layer.weights()[0] is layer.weight
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), cast_once(x):
        w, b = layer.weights()
        assert w.dtype == b.dtype == torch.bfloat16 and layer.weights()[0] is w
    assert layer.weights()[0] is layer.weight  # the region's casts end with it


def test_training_gradients_are_unchanged():
    """A training forward under autocast takes the parameters (autocast's per-use casts), so
    gradients reach the fp32 weights as an nn.Linear's do."""
    torch.manual_seed(0)
    layer = CastOnceLinear(8, 8)
    plain = torch.nn.Linear(8, 8)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    for m in (layer, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16), cast_once(x):
            m(x).float().square().sum().backward()
    assert torch.equal(layer.weight.grad, plain.weight.grad)
    assert torch.equal(layer.bias.grad, plain.bias.grad)
