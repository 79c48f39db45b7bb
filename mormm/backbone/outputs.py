"""What the backbone hands to the head, the loss and the analysis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor


class StepTrace:
    """One recursion step, broadcast to tokens so analysis can map it back to the input.

    selected: (B, N) bool, the tokens the step processed;
    logits:   (B, N) float router logits (None without a router);
    gate:     (B, N) float gate applied to the step's update (None without a router).

    A step routed over the backbone's compact working set knows only the tokens that competed
    for it; each of its maps is built on first access (tokens that did not compete read logit and
    gate 0), so an inference forward that never looks at them pays nothing for them, and the
    statistics that read selections and logits pay nothing for the gates.
    """

    def __init__(self, selected: Tensor, logits: Tensor | None, gate: Tensor | None) -> None:
        self._maps: list = [selected, logits, gate]
        self._builds: tuple | None = None  # per map, what builds it (compact steps)

    @classmethod
    def compact(
        cls, n: int, competed: Tensor | None, chosen: Tensor | None, logits: Tensor,
        gate: Tensor | Callable[[], Tensor], taken: Tensor | None = None,
        spread: Callable[[Tensor], Tensor] | None = None,
    ) -> StepTrace:
        """competed (B, M) positions of the tokens that competed (None: all n, in order), with
        their logits and gates (or a function that computes the gates, called on first access),
        per token (B, M) or per unit, which `spread` takes to tokens; chosen (B, K) positions of
        the step's slots (None: all n) and taken (B, K) bool, which of those slots took the step
        (None: all)."""
        B = logits.shape[0]

        def selected() -> Tensor:
            if chosen is None:
                return torch.ones(B, n, dtype=torch.bool, device=logits.device)
            out = torch.zeros(B, n, dtype=torch.bool, device=logits.device)
            return out.scatter(1, chosen, True if taken is None else taken)

        def placed(v: Tensor) -> Tensor:
            v = v if spread is None else spread(v)
            return v if competed is None else v.new_zeros(B, n).scatter(1, competed, v)

        trace = cls.__new__(cls)
        trace._maps = [None, None, None]
        trace._builds = (selected, lambda: placed(logits),
                         lambda: placed(gate() if callable(gate) else gate))
        return trace

    def _get(self, i: int):
        if self._maps[i] is None and self._builds is not None:
            self._maps[i] = self._builds[i]()
        return self._maps[i]

    @property
    def selected(self) -> Tensor:
        return self._get(0)

    @property
    def logits(self) -> Tensor | None:
        return self._get(1)

    @property
    def gate(self) -> Tensor | None:
        return self._get(2)


@dataclass
class BackboneOutput:
    hidden: Tensor  # (B, N, D) final hidden states (after the final norm)
    count_depth: Callable[[], Tensor] = field(repr=False)  # builds `depth` (read that instead)
    steps: list[StepTrace]
    aux_loss: Tensor  # scalar: sum of the weighted router losses (0 without a router)
    losses: dict[str, Tensor] = field(default_factory=dict)  # weighted router losses, summed
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached router numbers
    valid: Tensor | None = None  # (B, N) bool, None when nothing is padded

    @cached_property
    def depth(self) -> Tensor:
        """(B, N) long: recursions each token received (0 for padding). Counted on first access,
        as the step traces' maps are: a forward whose depth nobody reads (a classifier's
        inference, training steps whose statistics are not logged) launches none of the
        counting ops."""
        return self.count_depth()
