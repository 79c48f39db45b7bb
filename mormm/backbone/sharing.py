"""Parameter-sharing strategies as pure functions (MoR paper, section 2.1).

An effective depth of L layers is built from a smaller pool of distinct layers. The schedule maps
each effective layer to the index of the weights it uses; for L=9, N_r=3:

    cycle            0 1 2 0 1 2 0 1 2
    sequence         0 0 0 1 1 1 2 2 2
    middle_cycle     0 1 2 3 1 2 3 1 2 3 4   shown for L=11: first and last layers keep their own
    middle_sequence  0 1 1 1 2 2 2 3 3 3 4   weights; the middle L-2 must split into N_r chunks
                                             (L=9 is rejected: 7 middle layers, N_r=3)
    none             0 1 2 ... L-1 (vanilla)

The shared part (all L layers, or the middle L-2) is cut into N_r contiguous chunks: chunk r is the
recursion block applied at recursion step r, the unit the router decides on.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")


def _shared_span(strategy: str, num_layers: int) -> int:
    return num_layers - 2 if strategy.startswith("middle_") else num_layers


def validate_depth(strategy: str, num_layers: int, num_recursions: int) -> None:
    """Raise a ValueError naming the fix when L and N_r do not fit the strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sharing={strategy!r} is unknown; choose one of {STRATEGIES}")
    if num_layers < 1 or num_recursions < 1:
        raise ValueError(
            f"num_layers={num_layers} and num_recursions={num_recursions} must both be >= 1"
        )
    span = _shared_span(strategy, num_layers)
    if span < num_recursions or span % num_recursions:
        where = "the middle L-2 layers" if strategy.startswith("middle_") else "L"
        ok = [n for n in range(num_recursions, num_recursions * 8 + 1, num_recursions)]
        if strategy.startswith("middle_"):
            ok = [n + 2 for n in ok]
        raise ValueError(
            f"sharing={strategy!r} needs {where} to be a positive multiple of "
            f"num_recursions={num_recursions}, got num_layers={num_layers}; "
            f"use num_layers in {ok[:4]} or change num_recursions"
        )


def layer_schedule(strategy: str, num_layers: int, num_recursions: int) -> list[int]:
    """Effective layer index -> index of the distinct weights it uses."""
    validate_depth(strategy, num_layers, num_recursions)
    if strategy == "none":
        return list(range(num_layers))
    middle = strategy.startswith("middle_")
    span = _shared_span(strategy, num_layers)
    block = span // num_recursions  # distinct layers in the shared pool
    offset = 1 if middle else 0
    if strategy.endswith("cycle"):
        shared = [offset + i % block for i in range(span)]
    else:  # sequence: each distinct layer repeated N_r times in a row
        shared = [offset + i // num_recursions for i in range(span)]
    return [0, *shared, offset + block] if middle else shared


def num_unique_layers(strategy: str, num_layers: int, num_recursions: int) -> int:
    return len(set(layer_schedule(strategy, num_layers, num_recursions)))


@dataclass(frozen=True)
class SharingPlan:
    """Where each weight index is used: before the recursions, in each step, after them."""

    prelude: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    coda: tuple[int, ...]
    num_weights: int

    @property
    def reuses_weights(self) -> bool:
        """Whether some weights run more than once per forward (every strategy but none)."""
        return self.num_weights < len(self.prelude) + sum(map(len, self.steps)) + len(self.coda)


def sharing_plan(strategy: str, num_layers: int, num_recursions: int) -> SharingPlan:
    schedule = layer_schedule(strategy, num_layers, num_recursions)
    middle = strategy.startswith("middle_")
    shared = schedule[1:-1] if middle else schedule
    size = len(shared) // num_recursions
    steps = tuple(tuple(shared[r * size : (r + 1) * size]) for r in range(num_recursions))
    return SharingPlan(
        prelude=(schedule[0],) if middle else (),
        steps=steps,
        coda=(schedule[-1],) if middle else (),
        num_weights=len(set(schedule)),
    )
