"""Invalid configurations fail at construction with a ValueError that names the field."""

import pytest
import torch

from encoders.tokens import Tokens
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone, TokenChoiceRouter

SMALL = dict(dim=32, num_heads=4, num_layers=6, num_recursions=3, sharing="cycle")


def test_default_backbone_config_builds():
    cfg = BackboneConfig()  # the defaults are a valid model, not a starting point to fix
    assert MoRBackbone(cfg).plan.num_weights < cfg.num_layers


@pytest.mark.parametrize("changes,field", [
    (dict(num_heads=5), "num_heads"),
    (dict(num_heads=0), "num_heads"),
    (dict(sharing="ring"), "sharing"),
    (dict(num_layers=7), "num_layers"),  # cycle: L must be a multiple of N_r
    (dict(num_layers=2), "num_layers"),  # fewer layers than recursions
    (dict(sharing="middle_cycle", num_layers=6), "num_layers"),  # 4 middle layers, N_r=3
    (dict(sharing="middle_sequence", num_layers=9), "num_layers"),
    (dict(num_recursions=0), "num_recursions"),
    (dict(kv_mode="cached"), "kv_mode"),
    (dict(gate_update="residual"), "gate_update"),
    (dict(rope_axes=4), "rope_axes"),
    (dict(dim=8, num_heads=4, rope_axes=2), "rope_axes=2"),  # head_dim 2: one pair, two axes
    (dict(dim=36, num_heads=4, rope_axes=2), "head_dim=9"),  # odd: channels come in pairs
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(drop_path=1.0), "drop_path"),
])
def test_invalid_backbone_config(changes, field):
    with pytest.raises(ValueError, match=field):
        BackboneConfig(**{**SMALL, **changes})


@pytest.mark.parametrize("router,field", [
    (lambda: ExpertChoiceRouter(capacities=[1.0, 0.0, 0.0]), "capacities"),
    (lambda: ExpertChoiceRouter(capacities=[1.0, 1.5, 0.5]), "capacities"),
    (lambda: ExpertChoiceRouter(capacities=[1.0, -0.5, -0.5]), "capacities"),
    (lambda: ExpertChoiceRouter(capacities=[0.5, 0.75, 0.25]), "capacities"),  # increasing
    (lambda: ExpertChoiceRouter(capacities=[1.0, 0.5]), "capacities"),  # 2 for N_r=3
    (lambda: ExpertChoiceRouter(capacities=[1.0, 0.75, 0.5, 0.25]), "capacities"),
    (lambda: TokenChoiceRouter(capacities=[1.0, 0.5, 0.75]), "capacities"),
])
def test_invalid_capacities_fail_when_bound(router, field):
    with pytest.raises(ValueError, match=field):
        MoRBackbone(BackboneConfig(**SMALL), router())


@pytest.mark.parametrize("make,field", [
    (lambda: ExpertChoiceRouter(activation="relu"), "activation"),
    (lambda: ExpertChoiceRouter(unit="frame"), "unit"),
    (lambda: ExpertChoiceRouter(inference="greedy"), "inference"),
    (lambda: ExpertChoiceRouter(alpha=0.0), "alpha"),
    (lambda: ExpertChoiceRouter(threshold_slack=0.5), "threshold_slack"),
    (lambda: TokenChoiceRouter(balancing="aux"), "balancing"),
    (lambda: TokenChoiceRouter(capacity_factor=0.5), "capacity_factor"),
    (lambda: TokenChoiceRouter(unit="window"), "unit"),
    (lambda: ExpertChoiceRouter(capacities=[]), "capacities is empty"),
    (lambda: ExpertChoiceRouter(aux_loss_coef=-1e-3), "aux_loss_coef"),
    (lambda: ExpertChoiceRouter(mlp_hidden=0), "mlp_hidden"),
    (lambda: TokenChoiceRouter(alpha=0.0), "alpha"),
    (lambda: TokenChoiceRouter(bias_rate=-0.1), "bias_rate"),
])
def test_invalid_router_arguments(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_shared_kv_needs_full_first_capacity():
    cfg = BackboneConfig(**SMALL, kv_mode="shared")
    with pytest.raises(ValueError, match="kv_mode='shared'.*capacities"):
        MoRBackbone(cfg, ExpertChoiceRouter(capacities=[0.75, 0.5, 0.25]))
    with pytest.raises(ValueError, match="kv_mode='shared'"):
        MoRBackbone(cfg, TokenChoiceRouter(capacities=[0.5, 0.5, 0.25]))
    # Allowed: full first step, or token-choice whose capacity factor lifts step 0 to 1.
    MoRBackbone(cfg, ExpertChoiceRouter(capacities=[1.0, 0.5, 0.25]))
    MoRBackbone(cfg, TokenChoiceRouter(capacities=[0.5, 0.5, 0.25], capacity_factor=2.0))
    MoRBackbone(BackboneConfig(**SMALL), ExpertChoiceRouter(capacities=[0.75, 0.5, 0.25]))


def test_more_position_axes_than_rope_axes_fails_at_forward():
    model = MoRBackbone(BackboneConfig(**SMALL, rope_axes=2))
    B, N = 1, 4
    tokens = Tokens(torch.randn(B, N, 32), torch.rand(B, N, 3), Tokens.default_segments(B, N),
                    torch.zeros(B, N, dtype=torch.long))
    with pytest.raises(ValueError, match="rope_axes"):
        model(tokens)


def _tokens(**changes):
    B, N = 2, 6
    fields = dict(embeddings=torch.randn(B, N, 32), positions=torch.rand(B, N, 2),
                  segment_ids=Tokens.default_segments(B, N), modality_ids=torch.zeros(B, N, dtype=torch.long))
    return Tokens(**{**fields, **changes})


@pytest.mark.parametrize("changes,field", [
    (dict(padding_mask=torch.zeros(2, 6, dtype=torch.long)), "padding_mask must be bool"),
    (dict(segment_ids=torch.zeros(2, 6)), "segment_ids must hold integer ids"),
    (dict(modality_ids=torch.zeros(2, 6, dtype=torch.bool)), "modality_ids must hold integer ids"),
    (dict(max_segment_len=0), "max_segment_len"),
    (dict(positions=torch.rand(2, 5, 2)), "positions"),
    (dict(num_segments=2, max_segment_len=2, contiguous_segments=True), "contiguous_segments"),
])
def test_malformed_tokens_are_rejected(changes, field):
    with pytest.raises(ValueError, match=field):
        _tokens(**changes)


@pytest.mark.parametrize("changes,message", [
    # ids past the static bound would be routed as some other segment
    (dict(segment_ids=torch.tensor([[0, 0, 1, 1, 2, 2]] * 2), num_segments=2, max_segment_len=2),
     "segment_ids must lie in"),
    # a segment longer than the bound would be selected, counted in depth, and never computed
    (dict(segment_ids=torch.tensor([[0, 0, 0, 1, 1, 1]] * 2), num_segments=2, max_segment_len=2),
     "max_segment_len=2"),
])
def test_segment_bounds_are_checked_on_the_device(changes, message):
    model = MoRBackbone(BackboneConfig(**SMALL, rope_axes=2), ExpertChoiceRouter(unit="segment"))
    with pytest.raises(RuntimeError, match=message):
        model(_tokens(**changes))
