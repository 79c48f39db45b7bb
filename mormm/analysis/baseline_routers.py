"""Chance baselines for the learned router, swapped in at analysis time (DESIGN.md §2: always
compare token selection against random dropping and a uniform, capacity-matched pattern).

Dimension legend:
    B batch, U routing units

Both baselines wrap a trained router and keep everything but the choice of units: its unit
(token or segment), its capacities, and its gate (the learned router still scores every unit
and its gate weights the update), so a difference in accuracy or in where depth goes is due to
*which* units recurse, nothing else. Each step selects exactly ceil(capacity x existing units)
units of each sample among those still active (hierarchical filtering, as the learned
expert-choice router does).

    model.model.backbone.router = RandomRouter(model.model.backbone.router, seed=0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mormm.backbone.routers import Route, Router, _select_top
from mormm.backbone.units import Units, capacity_count, capacity_counts


class BaselineRouter(Router):
    """Selection replaced, everything else from `learned` (a bound Router)."""

    def __init__(self, learned: Router, seed: int = 0) -> None:
        if learned.num_steps == 0:
            raise ValueError(f"{type(self).__name__} needs a router bound to a backbone (call bind first)")
        super().__init__(list(learned.capacities), learned.unit)
        self.num_steps = learned.num_steps
        self.learned = learned
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """One seeded generator per device: the same seed gives the same choices on a rerun."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def choose(self, active: Tensor, budget: Tensor, kept: int) -> tuple[Tensor, Tensor]:
        """(B, U) active units, (B,) units to keep -> (B, U) bool selection, (B, kept) indices
        with the selected units first (what the backbone's masked steps lay out)."""
        raise NotImplementedError

    def route(self, step: int, hidden: Tensor, units: Units, active: Tensor, carry: Any,
              scores: Tensor | None = None, fused: bool = False) -> Route:
        learned = self.learned.route(step, hidden, units, active, carry, scores, fused=fused)
        cap = self.capacities[step]  # nominal capacity (a token-choice capacity_factor is slack)
        kept = capacity_count(cap, units.num_units)
        existing = units.counts(active.shape[0], active.device)
        budget = torch.minimum(capacity_counts(cap, existing), active.sum(-1))  # (B,)
        selected, index = self.choose(active, budget, kept)
        exact = units.full
        return Route(
            selected=selected,
            gate=learned.gate,
            sigmoid_scale=learned.sigmoid_scale,
            logits=learned.logits,
            kept=kept,
            exact=exact,
            carry=learned.carry,
            index=index,  # ranked: the chosen units first
        )


class RandomRouter(BaselineRouter):
    """Random dropping: each step keeps `budget` active units chosen uniformly at random."""

    def choose(self, active: Tensor, budget: Tensor, kept: int) -> tuple[Tensor, Tensor]:
        scores = torch.rand(active.shape, generator=self.generator(active.device), device=active.device)
        return _select_top(active, scores, budget, kept)[:2]


class UniformRouter(BaselineRouter):
    """Evenly spaced units: of the a active units of a sample (in sequence order), keep the k whose
    rank j satisfies floor(((j + 1) k + p) / a) > floor((j k + p) / a), with a random phase p in
    [0, a) per sample and step. That is Bresenham's line: exactly k ranks, spaced a / k apart
    (rounded), at the same places whatever the content."""

    def choose(self, active: Tensor, budget: Tensor, kept: int) -> tuple[Tensor, Tensor]:
        a = active.sum(-1, keepdim=True)  # (B, 1)
        k = budget[:, None]  # (B, 1)
        u = torch.rand(a.shape, generator=self.generator(active.device), device=active.device)
        phase = (u * a).long().clamp(max=(a - 1).clamp(min=0))  # (B, 1) in [0, a)
        rank = active.long().cumsum(-1) - 1  # (B, U) rank among active units
        a_ = a.clamp(min=1)
        take = ((rank + 1) * k + phase).div(a_, rounding_mode="floor") > (rank * k + phase).div(
            a_, rounding_mode="floor"
        )
        selected = active & take
        # Indices of the selected units (ties among the unselected do not matter).
        order = selected.to(torch.float32) - torch.arange(active.shape[1], device=active.device) / (
            2.0 * active.shape[1]
        )
        return selected, order.topk(kept, dim=-1).indices


BASELINES = {"random": RandomRouter, "uniform": UniformRouter}


def swap_router(backbone, kind: str, seed: int = 0) -> Router | None:
    """Replace `backbone.router` by the `kind` baseline ("learned" leaves it); returns the learned
    router so it can be put back."""
    learned = backbone.router
    if isinstance(learned, BaselineRouter):
        learned = learned.learned
    if kind == "learned":
        backbone.router = learned
        return learned
    if kind not in BASELINES:
        raise ValueError(f"router {kind!r} is unknown; choose learned, {', '.join(BASELINES)}")
    if learned is None:
        raise ValueError(f"the model has no router (plain recursion), so there is nothing to compare "
                         f"the {kind} router with")
    backbone.router = BASELINES[kind](learned, seed)
    return learned
