"""No forward or training step of the backbone waits for the GPU (CUDA only: skipped elsewhere).

Short clips are bound by the host's launches: a step runs at the GPU's pace only while the host
stays ahead of it, issuing the next kernels as the GPU runs the last. One host sync inside a
forward (an `.item()`, a data-dependent shape, a blocking copy) drains that queue and puts the
host's whole launch time on the clock; shapes are static for this reason (recursion.py). Here
every benchmark variant runs with the CUDA sync check set to raise, eagerly (the fused Triton
path at inference), in training and depth-wise, over unpadded and padded clips.
"""

import pytest
import torch

from helpers import NoHostSyncs, on_device, random_tokens
from mormm.backbone import DepthwiseBatcher
from mormm.bench.models import VARIANTS, build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="host syncs are a CUDA notion")
DEV = torch.device("cuda")


def _backbone(name: str):
    torch.manual_seed(0)
    return build_model(VARIANTS[name], 64, 2, 8, 4).backbone.to(DEV)


def _tokens(padded: bool, B: int = 4, N: int = 48):
    lengths = [N, N - 8, N - 16, N - 20] if padded else None
    return on_device(random_tokens(B, N, 64, lengths=lengths, segments=6), DEV)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_inference_and_training_issue_without_waiting(name, padded):
    backbone = _backbone(name)
    tokens = _tokens(padded)
    backbone.eval()
    for check in (False, True):  # the first call compiles the Triton kernels (which may sync)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), NoHostSyncs(check):
            out = backbone(tokens)
    assert out.hidden.isfinite().all()
    backbone.train()
    for check in (False, True):
        with NoHostSyncs(check):
            with torch.autocast("cuda", torch.bfloat16):
                out = backbone(tokens)
                loss = out.hidden.float().square().mean() + out.aux_loss
            loss.backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert all(g is not None and g.isfinite().all() for g in grads)


@pytest.mark.parametrize("name", ["mor_ec", "mor_tc", "mor_ec_segment"])
def test_depthwise_stream_issues_without_waiting(name):
    batcher = DepthwiseBatcher(_backbone(name).eval())
    batches = [_tokens(False) for _ in range(6)]
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        list(batcher.run(batches))  # compiles the kernels, caches the layouts in flight
        with NoHostSyncs():
            outs = list(batcher.run(batches))
    assert len(outs) == len(batches)
