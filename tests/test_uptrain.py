"""Uptraining copies the right source layers into the right shared slots (Relaxed Recursive
Transformers / MoR init methods), from a mormm vanilla checkpoint and from a timm ViT."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from encoders import AudioTokenizer
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone
from mormm.lit import MoRModule
from mormm.uptrain import UptrainInit

DIM, HEADS = 32, 2


def module(num_layers: int, num_recursions: int, sharing: str, init_from=None, router=True) -> MoRModule:
    config = BackboneConfig(dim=DIM, num_heads=HEADS, num_layers=num_layers,
                            num_recursions=num_recursions, sharing=sharing, rope_axes=2)
    backbone = MoRBackbone(config, ExpertChoiceRouter() if router else None)
    tokenizer = AudioTokenizer(DIM, n_mels=32, layout="frames", frames_per_token=4)
    model = MoRModule(tokenizer, backbone, num_classes=3, init_from=init_from)
    start_fit(model)
    return model


def start_fit(model: MoRModule, ckpt_path: str | None = None) -> None:
    """What Trainer.fit does to the module at the point uptraining happens."""
    model._trainer = SimpleNamespace(ckpt_path=ckpt_path)
    model.on_fit_start()


def assert_layer_is(target: torch.nn.Module, sources: list[dict[str, torch.Tensor]]):
    own = target.state_dict()
    assert own
    for k, v in own.items():
        expected = torch.stack([s[k].float() for s in sources]).mean(0)
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-7, msg=k)


# Target: middle_cycle, 8 effective layers, 3 recursions -> weights [0, 1, 2, 1, 2, 1, 2, 3]:
# unique first (0) and last (3); shared 1 stands in for source layers 1, 3, 5 and shared 2 for
# 2, 4, 6 of an 8-layer source.
MIDDLE_CYCLE_8 = {
    "stepwise": {1: [1], 2: [4]},  # evenly spaced over the shared span 1..6
    "average": {1: [1, 3, 5], 2: [2, 4, 6]},
    "lower": {1: [1], 2: [2]},
    "upper": {1: [5], 2: [6]},
}


@pytest.fixture(scope="module")
def vanilla_ckpt(tmp_path_factory) -> tuple[Path, MoRModule]:
    torch.manual_seed(0)
    source = module(8, 1, "none", router=False)
    path = tmp_path_factory.mktemp("src") / "vanilla.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)  # the layout Lightning writes
    return path, source


@pytest.mark.parametrize("method", sorted(MIDDLE_CYCLE_8))
def test_uptrain_from_a_mormm_vanilla_checkpoint(vanilla_ckpt, method: str):
    path, source = vanilla_ckpt
    src = [layer.state_dict() for layer in source.backbone.layers]
    target = module(8, 3, "middle_cycle", UptrainInit(str(path), method, "mormm"))
    layers = target.backbone.layers
    assert len(layers) == 4
    assert_layer_is(layers[0], [src[0]])
    assert_layer_is(layers[3], [src[7]])
    for w, ids in MIDDLE_CYCLE_8[method].items():
        assert_layer_is(layers[w], [src[i] for i in ids])
    assert_layer_is(target.backbone.norm, [source.backbone.norm.state_dict()])
    # Everything else with a matching name and shape comes along (tokenizer, pooling, head).
    assert_layer_is(target.model.tokenizer, [source.model.tokenizer.state_dict()])
    assert_layer_is(target.model.head, [source.model.head.state_dict()])


# Target: cycle, 12 effective layers, 3 recursions -> 4 shared layers [0 1 2 3] x 3 from a 12-block
# ViT: shared j stands in for blocks j, j + 4, j + 8.
CYCLE_12 = {
    "stepwise": {0: [0], 1: [3], 2: [6], 3: [9]},
    "average": {j: [j, j + 4, j + 8] for j in range(4)},
    "lower": {j: [j] for j in range(4)},
    "upper": {j: [8 + j] for j in range(4)},
}


@pytest.mark.parametrize("method", sorted(CYCLE_12))
def test_uptrain_from_a_timm_vit_state_dict(tmp_path: Path, method: str):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, depth=12, embed_dim=DIM, num_heads=HEADS,
                            num_classes=0)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    target = module(12, 3, "cycle", UptrainInit(str(path), method, "timm"))
    assert len(target.backbone.layers) == 4
    blocks = [b.state_dict() for b in vit.blocks]
    for w, ids in CYCLE_12[method].items():
        assert_layer_is(target.backbone.layers[w], [blocks[i] for i in ids])
    assert_layer_is(target.backbone.norm, [vit.norm.state_dict()])


def test_uptraining_happens_once_at_the_start_of_a_fresh_fit(vanilla_ckpt, tmp_path: Path):
    """Construction (validate, test, predict, analysis) and resuming never read the source: a
    resumed run takes its weights from its own checkpoint, even after the source file is gone."""
    path, source = vanilla_ckpt
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes(path.read_bytes())
    torch.manual_seed(1)
    target = MoRModule(source.model.tokenizer, MoRBackbone(BackboneConfig(
        dim=DIM, num_heads=HEADS, num_layers=8, num_recursions=3, sharing="middle_cycle", rope_axes=2),
        ExpertChoiceRouter()), num_classes=3, init_from=UptrainInit(str(moved), "lower", "mormm"))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    moved.unlink()
    start_fit(target, ckpt_path="runs/last.ckpt")  # resuming: the missing source is not read
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(ValueError, match="does not exist"):  # a fresh fit needs it
        start_fit(target)


def test_uptrain_rejects_a_bad_method_and_a_missing_file(tmp_path: Path):
    with pytest.raises(ValueError, match="init_from.method='middle' is unknown"):
        UptrainInit("x.ckpt", "middle")
    with pytest.raises(ValueError, match="does not exist"):
        module(8, 3, "middle_cycle", UptrainInit(str(tmp_path / "nope.ckpt")))
