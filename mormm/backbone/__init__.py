"""Modality-agnostic Mixture-of-Recursions backbone."""

from mormm.backbone.config import BackboneConfig
from mormm.backbone.depthwise import DepthwiseBatcher
from mormm.backbone.inductor import compile_options, inference_config
from mormm.backbone.outputs import BackboneOutput, StepTrace
from mormm.backbone.recursion import MoRBackbone
from mormm.backbone.routers import ExpertChoiceRouter, Route, Router, TokenChoiceRouter
from mormm.backbone.sharing import (
    STRATEGIES,
    layer_schedule,
    num_unique_layers,
    sharing_plan,
)

__all__ = [
    "STRATEGIES",
    "BackboneConfig",
    "BackboneOutput",
    "DepthwiseBatcher",
    "ExpertChoiceRouter",
    "MoRBackbone",
    "Route",
    "Router",
    "StepTrace",
    "TokenChoiceRouter",
    "compile_options",
    "inference_config",
    "layer_schedule",
    "num_unique_layers",
    "sharing_plan",
]
