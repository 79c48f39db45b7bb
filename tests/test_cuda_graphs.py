"""MoRModule(compile="reduce-overhead") on a GPU: the backbone replays as CUDA graphs, whose
outputs (gradients included) are rewritten by the next replay, so everything kept past a step
must be a copy (token-choice loads averaged over accumulated micro-batches, predicted depth
maps) and accumulated gradients must live in buffers of their own. On the H200 this test failed
with either fix removed. CUDA only: skipped elsewhere."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from encoders import VideoTokenizer
from mormm.backbone import BackboneConfig, MoRBackbone, TokenChoiceRouter
from mormm.lit import MoRModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _clips(n: int, seed: int) -> list[dict]:
    # Class 1 is brighter: learnable in a few steps.
    g = torch.Generator().manual_seed(seed)
    return [{"video": torch.rand(4, 3, 32, 32, generator=g) * 0.5 + 0.25 * (i % 2),
             "label": i % 2} for i in range(n)]


def _module(compile) -> MoRModule:
    torch.manual_seed(0)
    backbone = MoRBackbone(
        BackboneConfig(dim=64, num_heads=2, num_layers=4, num_recursions=2, sharing="cycle"),
        TokenChoiceRouter(balancing="loss_free", bias_rate=0.01),
    )
    return MoRModule(VideoTokenizer(64, patch_size=8), backbone, num_classes=2, lr=3e-3,
                     warmup_steps=1, compile=compile)


def _trainer(tmp_path, precision="32-true", **kw) -> L.Trainer:
    return L.Trainer(accelerator="gpu", devices=1, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kw)


def test_reduce_overhead_trains_with_accumulation_and_predicts_like_eager(tmp_path):
    train = DataLoader(_clips(64, 0), batch_size=8, shuffle=True, drop_last=True)
    model = _module("reduce-overhead")
    # Two micro-batches per optimizer step: the first one's token-choice load is read after the
    # second forward has replayed the graph.
    _trainer(tmp_path, "bf16-mixed", max_epochs=5, accumulate_grad_batches=2).fit(model, train)
    assert model.backbone.router.depth_bias.abs().sum() > 0  # the loads reached the bias update

    eager = _module(False)
    eager.load_state_dict(model.state_dict())
    test = DataLoader(_clips(24, 1), batch_size=8)
    got = _trainer(tmp_path).predict(model, test)  # fp32: eager and compiled pick equal depths
    want = _trainer(tmp_path).predict(eager, test)
    for g, w in zip(got, want, strict=True):  # batch 0 is read after two more replays
        assert torch.equal(g["depth"], w["depth"])
        torch.testing.assert_close(g["probs"], w["probs"], atol=2e-2, rtol=0)
    accuracy = torch.cat([p["probs"].argmax(-1).cpu() == torch.arange(8) % 2 for p in got]).float()
    assert accuracy.mean() > 0.9
