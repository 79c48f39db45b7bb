"""What the backbone hands to the head, the loss and the analysis."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class StepTrace:
    """One recursion step, broadcast to tokens so analysis can map it back to the input."""

    selected: Tensor  # (B, N) bool: tokens the step processed
    logits: Tensor | None  # (B, N) float router logits (None without a router)
    gate: Tensor | None  # (B, N) float gate applied to the step's update


@dataclass
class BackboneOutput:
    hidden: Tensor  # (B, N, D) final hidden states (after the final norm)
    depth: Tensor  # (B, N) long: recursions each token received (0 for padding)
    steps: list[StepTrace]
    aux_loss: Tensor  # scalar: sum of the weighted router losses (0 without a router)
    losses: dict[str, Tensor] = field(default_factory=dict)  # weighted router losses, summed
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached router numbers
    valid: Tensor | None = None  # (B, N) bool, None when nothing is padded
