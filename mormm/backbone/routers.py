"""Routers decide, per recursion step, which units (tokens or segments) take the step.

Dimension legend:
    B batch, N tokens, U units, D width, R = N_r recursion steps

A router is built with its hyper-parameters only (so YAML stays short); the backbone calls
`bind(dim, num_steps)` once to create its projections. `route` is called at every step with the
current hidden states and returns a `Route`; whatever the router decided up front (token-choice)
travels to the next call in `Route.carry`, never on the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mormm.backbone import fused_routing
from mormm.backbone.units import Units, capacity_count, capacity_counts, gather_rows

ACTIVATIONS = ("sigmoid", "tanh")
UNITS = ("token", "segment")


@dataclass
class Route:
    """What a router decided for one step."""

    # (B, U) bool units that take this step (a subset of the active ones). May be None when the
    # call got active=None (compact working set), where `index` and `taken` say it all.
    selected: Tensor | None
    # (B, U) float weight of the step's update. None: sigmoid_scale * sigmoid(logits), computed
    # by whoever needs it (`gates()`): a fused merge computes it in its kernel, a launch saved.
    gate: Tensor | None
    logits: Tensor  # (B, U) float router logits (for logging / analysis)
    kept: int  # static bound on selected units per sample
    exact: bool  # statically known: every sample selects exactly `kept` units, no padding
    losses: dict[str, Tensor] = field(default_factory=dict)  # weighted auxiliary losses
    # Detached numbers the training loop needs after the optimizer step (token-choice "load");
    # numbers to log come from Router.statistics, outside the forward.
    stats: dict[str, Tensor] = field(default_factory=dict)
    carry: Any = None
    # (B, kept) indices of the top-`kept` units: in no particular order when exact, else by rank
    # (the taken ones first, `taken` says which). None when every unit is selected.
    index: Tensor | None = None
    taken: Tensor | None = None  # (B, kept) bool, which of `index` take the step; None: all
    sigmoid_scale: float | None = None  # see `gate`

    def gates(self) -> Tensor:
        """The (B, U) gates, computed on first use where the router left them to its user."""
        if self.gate is None:
            self.gate = sigmoid_gate(self.logits, self.sigmoid_scale)
        return self.gate


def sigmoid_gate(logits: Tensor, scale: float) -> Tensor:
    """scale * sigmoid(logits): expert-choice's default gate, wherever it is computed outside
    the fused merge (which computes the same in its kernel, fused.merge_rows)."""
    return scale * torch.sigmoid(logits)


def default_capacities(num_steps: int) -> list[float]:
    """(N_r - j + 1) / N_r for j = 1..N_r: every token gets at least one recursion."""
    return [(num_steps - j) / num_steps for j in range(num_steps)]


def _check_capacities(capacities: list[float], num_steps: int, owner: str) -> None:
    if len(capacities) != num_steps:
        raise ValueError(
            f"{owner}.capacities has {len(capacities)} entries but the backbone has "
            f"num_recursions={num_steps}; give one capacity per recursion step"
        )
    for j, c in enumerate(capacities):
        if not 0.0 < c <= 1.0:
            raise ValueError(f"{owner}.capacities[{j}]={c} must be in (0, 1]")
    for j in range(1, num_steps):
        if capacities[j] > capacities[j - 1]:
            raise ValueError(
                f"{owner}.capacities must not increase (hierarchical filtering: a token dropped "
                f"at one step never returns), got {capacities}"
            )


def _select_top(
    eligible: Tensor | None, priority: Tensor, budget: Tensor | None, kept: int, mask: bool = True
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(B, U) bool: the `budget[b]` eligible units of highest priority (kept >= budget; budget
    None: `kept` of them, as many as are eligible), None unless `mask`; the (B, kept) indices of
    the top `kept` units, highest first; and (B, kept) bool, which of those are taken. Units of
    priority -inf are never eligible; eligible None: all others are."""
    masked = priority
    if eligible is not None:
        masked = torch.where(eligible, priority, float("-inf"))  # one kernel (masked_fill(~) two)
    top = masked.topk(kept, dim=-1)  # (B, kept), highest first
    take = top.values > float("-inf")  # eligible ones (one kernel; isfinite launches four)
    if budget is not None:
        take = take & (torch.arange(kept, device=priority.device) < budget[:, None])
    selected = torch.zeros_like(eligible).scatter(1, top.indices, take) if mask else None
    return selected, top.indices, take


def _check_nonnegative(owner: str, **values: float) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{owner}.{name}={v} must be >= 0 (0 turns it off)")


def _check_hidden(owner: str, mlp_hidden: int | None) -> None:
    if mlp_hidden is not None and mlp_hidden < 1:
        raise ValueError(
            f"{owner}.mlp_hidden={mlp_hidden} must be a positive width, or null for the linear router"
        )


def _weighted_mean(x: Tensor, w: Tensor | None) -> Tensor:
    if w is None:
        return x.mean()
    w = w.to(x.dtype)
    return (x * w).sum() / w.sum().clamp(min=1.0)


def _unit_mean(x: Tensor, w: Tensor | None) -> Tensor:
    """(B, U, R) -> (R,): mean over the units that exist (w (B, U); None: all)."""
    if w is None:
        return x.mean((0, 1))
    return (x * w[..., None]).sum((0, 1)) / w.sum().clamp(min=1)


def _projection(dim: int, mlp_hidden: int | None, out: int) -> nn.Module:
    """The router's scoring layer, its output zero at initialisation: every unit starts with the
    same score and gate, and the first gradients, that is the task, decide which units go deeper.
    A random projection instead ranks units by a random direction of their hidden states, and on
    the demo data that chance direction decided, seed by seed, whether events or background got
    the depth (see the analysis tests)."""
    if mlp_hidden is None:
        proj = nn.Linear(dim, out, bias=False)
    else:
        proj = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, out, bias=False))
    nn.init.zeros_(proj.weight if mlp_hidden is None else proj[-1].weight)
    return proj


def _score(proj: nn.Module, hidden: Tensor) -> Tensor:
    """Router logits in fp32. A linear router reads fp32 hidden states as they are (the residual
    stream is fp32 under autocast when the embeddings are): autocast would cast the whole
    (B, N, D) input to bf16 to feed a projection to 1 (expert-choice) or R (token-choice)
    outputs, a memory-bound product whose input cast (one more kernel, reading 4 and writing 2
    bytes per element) costs more than the product itself, and whose bf16 rounding would decide
    close top-k calls. Hidden states already in bf16 (a tokenizer that ran under autocast) and
    MLP routers, whose first layer is a real matrix product, keep autocast."""
    if not isinstance(proj, nn.Linear) or hidden.dtype != proj.weight.dtype:
        return proj(hidden).float()
    if proj.out_features == 1 and torch.compiler.is_compiling():
        # As a product and a row sum, inductor computes the scores in the kernel that wrote the
        # hidden states (the previous step's merge); a linear is a cuBLAS gemv that reads the
        # whole fp32 stream again (23 us per step at 32 x 1568 tokens on the H200).
        return (hidden * proj.weight[0]).sum(-1, keepdim=True)
    with torch.autocast(hidden.device.type, enabled=False):
        return proj(hidden).float()


class Router(nn.Module):
    """Common plumbing: capacities, units, binding."""

    def __init__(self, capacities: list[float] | None, unit: str) -> None:
        super().__init__()
        if unit not in UNITS:
            raise ValueError(f"{type(self).__name__}.unit={unit!r} is unknown; choose one of {UNITS}")
        if capacities is not None and len(capacities) == 0:
            raise ValueError(
                f"{type(self).__name__}.capacities is empty; give one fraction per recursion step "
                f"or leave it unset for the default (N_r - j + 1) / N_r"
            )
        self.unit = unit
        self._capacities = None if capacities is None else [float(c) for c in capacities]
        self.num_steps = 0

    @property
    def capacities(self) -> list[float]:
        return self._capacities or default_capacities(self.num_steps)

    def step_capacity(self, step: int) -> float:
        """Fraction of units this router may process at `step` (its static compute bound)."""
        return self.capacities[step]

    def bind(self, dim: int, num_steps: int) -> None:
        self.num_steps = num_steps
        _check_capacities(self.capacities, num_steps, type(self).__name__)
        self._build(dim, num_steps)

    def _build(self, dim: int, num_steps: int) -> None:
        raise NotImplementedError

    def compact(self, units: Units) -> bool:
        """Whether every step of this forward picks its units from those the previous step
        processed, by their hidden states and carry alone, over clips without padding. The
        backbone then keeps only those gathered between steps (its compact working set, see
        MoRBackbone): it routes them with `active` = the ones that took the previous step (None
        while all did) and hands the carry on through `gather_carry`. Routes that are not exact
        must then say which units they take (`Route.taken`)."""
        return False

    def gather_carry(self, carry: Any, index: Tensor) -> Any:
        """The carry of the units `index` (B, K) picks out of those the last call routed, for a
        backbone that goes on with those units only (compact working set)."""
        return carry

    def score_weight(self, step: int) -> Tensor | None:
        """(1, D) weight when the step's token scores are a bias-free linear map of the hidden
        states, which the backbone may compute while it writes those states (fused.py) and pass
        to `route` as `scores`; None otherwise (the router scores them itself)."""
        return None

    def reads_hidden(self, step: int) -> bool:
        """Whether `route(step, ...)` reads the hidden states (else its carry alone): a
        backbone that keeps its working set in the sequence (fused.py) hands the whole sequence
        to a step whose scores it neither fuses nor needs."""
        return True

    def route(
        self, step: int, hidden: Tensor, units: Units, active: Tensor | None, carry: Any,
        scores: Tensor | None = None, fused: bool = False,
    ) -> Route:
        """hidden (B, N, D) states of the units' tokens; active (B, U) units still in play, or
        None when every unit is; scores (B, N) fp32 hidden @ score_weight(step), or None (only
        given where score_weight(step) is not None); fused: eager inference where the
        backbone's Triton kernels run (fused.py): the router may do its bookkeeping in them too
        (fused_routing.py)."""
        raise NotImplementedError

    def after_optimizer_step(self, stats: dict[str, Tensor]) -> None:
        """Hook the training loop calls after each optimizer step (loss-free balancing)."""

    def statistics(self, steps: list, valid: Tensor | None) -> dict[str, Tensor]:
        """Numbers worth logging, derived from a forward's step traces (kept out of the forward
        itself, which then costs nothing extra at inference)."""
        return {}


class ExpertChoiceRouter(Router):
    """Each step keeps the top-k of the still-active units (MoR section 2.2.1, the paper's winner).

    capacities:    fraction of all units kept at each step (default (N_r-j+1)/N_r).
    alpha:         gate scale, g = alpha * activation(logit); 0.1 in the paper (1.0 collapsed into a
                   positional bias with ~66% dead tokens).
    activation:    "sigmoid" (default) or "tanh".
    mlp_hidden:    None for the paper's bias-free linear router (>= MLP there), or a hidden width.
    aux_loss_coef: BCE of logits against top-k membership; makes scores near-binary so that a
                   threshold can replace top-k when the whole clip is not available (0.001; 0.1
                   hurt in the paper).
    z_loss_coef:   mean squared logit (router z-loss; negligible effect in the paper, off).
    unit:          "token" or "segment" (whole segments share one decision and one gate).
    inference:     "topk" (whole clip known) or "threshold" (keep units with logit > 0, i.e.
                   score > 0.5 * alpha for sigmoid; for streaming). Threshold mode still bounds
                   compute by a static buffer of `threshold_slack` x the step's capacity.
    """

    def __init__(
        self,
        capacities: list[float] | None = None,
        alpha: float = 0.1,
        activation: str = "sigmoid",
        mlp_hidden: int | None = None,
        aux_loss_coef: float = 0.001,
        z_loss_coef: float = 0.0,
        unit: str = "token",
        inference: str = "topk",
        threshold_slack: float = 1.25,
    ) -> None:
        super().__init__(capacities, unit)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"ExpertChoiceRouter.activation={activation!r} is unknown; choose one of {ACTIVATIONS}"
            )
        if inference not in ("topk", "threshold"):
            raise ValueError(
                f"ExpertChoiceRouter.inference={inference!r} is unknown; choose 'topk' or 'threshold'"
            )
        if alpha <= 0:
            raise ValueError(f"ExpertChoiceRouter.alpha={alpha} must be positive")
        if threshold_slack < 1:
            raise ValueError(f"ExpertChoiceRouter.threshold_slack={threshold_slack} must be >= 1")
        _check_nonnegative(type(self).__name__, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef)
        _check_hidden(type(self).__name__, mlp_hidden)
        self.alpha = alpha
        self.activation = activation
        self.mlp_hidden = mlp_hidden
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.inference = inference
        self.threshold_slack = threshold_slack

    def _build(self, dim: int, num_steps: int) -> None:
        # One router per recursion step: what a step should refine differs from step to step.
        self.proj = nn.ModuleList(_projection(dim, self.mlp_hidden, 1) for _ in range(num_steps))

    @torch.no_grad()
    def statistics(self, steps: list, valid: Tensor | None) -> dict[str, Tensor]:
        """Per step r, among the tokens that competed (valid, active before r), counted per token
        (a segment weighs its size):
        agreement/step{r}:  how often "logit > 0" agrees with the top-k selection: whether
                            threshold (streaming) inference can replace top-k;
        separation/step{r}: mean logit of the selected minus mean logit of the rest: how
                            decisively the router separates them (steps at capacity 1 have no
                            rest and are left out)."""
        # Every step at once (R, B, N): evaluation pays these launches on every batch.
        selected = torch.stack([step.selected for step in steps])
        logits = torch.stack([step.logits for step in steps]).float()
        first = valid if valid is not None else torch.ones_like(selected[0])
        competed = torch.cat([first[None], selected[:-1]])
        rest = competed & ~selected

        def mean(x: Tensor, w: Tensor) -> Tensor:  # (R,) over each step's tokens w
            return (x * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)

        agreement = mean(((logits > 0) == selected).float(), competed).unbind()
        separation = (mean(logits, selected) - mean(logits, rest)).unbind()
        stats = {}
        for r in range(len(steps)):
            stats[f"agreement/step{r}"] = agreement[r]
            if self.capacities[r] < 1.0:
                stats[f"separation/step{r}"] = separation[r]
        return stats

    def gate_of(self, logits: Tensor) -> Tensor:
        if self.activation == "sigmoid":
            return sigmoid_gate(logits, self.alpha)
        return self.alpha * torch.tanh(logits)

    def compact(self, units: Units) -> bool:
        # Top-k over the units of unpadded clips: every step keeps exactly its static count of
        # units, chosen among those still active from their own hidden states alone.
        threshold = self.inference == "threshold" and not self.training
        return units.full and not threshold

    def score_weight(self, step: int) -> Tensor | None:
        proj = self.proj[step]
        return proj.weight if isinstance(proj, nn.Linear) else None

    def route(
        self, step: int, hidden: Tensor, units: Units, active: Tensor | None, carry: Any,
        scores: Tensor | None = None, fused: bool = False,
    ) -> Route:
        if scores is None:
            scores = _score(self.proj[step], hidden).squeeze(-1)
        logits = units.pool(scores)  # (B, U)
        cap = self.capacities[step]
        # Threshold inference decides only where there is something to decide: at capacity 1
        # every active unit takes the step (every token gets at least one recursion).
        threshold = self.inference == "threshold" and not self.training and cap < 1.0
        # Exact: every sample keeps exactly `kept` units, known from shapes alone (no padding,
        # full segments, top-k inference). Then top-k alone is the selection: no per-sample
        # budgets, no second ranking; every op skipped here is a kernel launch saved per step.
        exact = units.full and not threshold
        if threshold:
            # Keep every unit with logit > 0 up to the static buffer, not up to the top-k count
            # (bounding by `cap` left the slack unused: only the gather got wider).
            cap = min(1.0, cap * self.threshold_slack)
        kept = capacity_count(cap, units.population)
        everyone = active is None or step == 0  # every unit still in play (exact routes only)
        # Compact inference reads only the indices: the (B, U) mask is for losses and masks.
        mask = active is not None or self.training
        index = selected = taken = None
        if exact and everyone and kept >= units.num_units:
            if mask:  # nothing to choose
                selected = torch.ones_like(logits, dtype=torch.bool)
        elif exact:
            priority = logits if everyone else logits.masked_fill(~active, float("-inf"))
            top = priority.topk(kept, dim=-1, sorted=False).indices  # (B, kept)
            if mask:
                selected = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
            index = top
        else:
            eligible = active & (logits > 0) if threshold else active
            budget = capacity_counts(cap, units.counts(active.shape[0], active.device))
            selected, index, taken = _select_top(eligible, logits, budget, kept)

        losses = {}
        if self.training and (self.aux_loss_coef > 0 or self.z_loss_coef > 0):
            considered = None if active is None else active.to(logits.dtype)
            if self.aux_loss_coef > 0:
                bce = F.binary_cross_entropy_with_logits(
                    logits, selected.to(logits.dtype), reduction="none"
                )
                losses["router_bce"] = self.aux_loss_coef * _weighted_mean(bce, considered)
            if self.z_loss_coef > 0:
                losses["router_z"] = self.z_loss_coef * _weighted_mean(logits.square(), considered)
        # A sigmoid gate is left to the backbone, which may fold it into the step's merge.
        lazy = self.activation == "sigmoid"
        return Route(
            selected=selected,
            gate=None if lazy else self.gate_of(logits),
            logits=logits,
            kept=kept,
            exact=exact,
            losses=losses,
            index=index,
            taken=taken,
            sigmoid_scale=self.alpha if lazy else None,
        )


class TokenChoiceRouter(Router):
    """One router, one decision up front: each unit picks its depth (MoR section 2.2.1).

    The router reads the hidden states entering the first recursion, gives R logits per unit and
    the unit commits to depth argmax (+ balancing bias). The gate is alpha * softmax probability of
    the chosen depth, applied at every step the unit takes.

    Compute is bounded statically the way MoE layers bound experts: step j processes at most
    capacity_factor * capacities[j] of the units, by priority P(depth >= j). With balanced
    choices the default capacities are exactly the expected loads and nothing overflows; units
    that do overflow exit early (their realised depth is reported in the backbone output).

    balancing:          "loss" (sum_i f_i P_i, coefficient balance_coef, 0.1 in the paper) or
                        "loss_free" (per-depth bias, b_i += bias_rate * sign(mean load - load_i)
                        after each optimizer step; the bias affects selection only).
    """

    def __init__(
        self,
        capacities: list[float] | None = None,
        alpha: float = 1.0,
        mlp_hidden: int | None = None,
        balancing: str = "loss",
        balance_coef: float = 0.1,
        bias_rate: float = 0.001,
        capacity_factor: float = 1.0,
        z_loss_coef: float = 0.0,
        unit: str = "token",
    ) -> None:
        super().__init__(capacities, unit)
        if balancing not in ("loss", "loss_free"):
            raise ValueError(
                f"TokenChoiceRouter.balancing={balancing!r} is unknown; choose 'loss' or 'loss_free'"
            )
        if capacity_factor < 1:
            raise ValueError(f"TokenChoiceRouter.capacity_factor={capacity_factor} must be >= 1")
        if alpha <= 0:
            raise ValueError(f"TokenChoiceRouter.alpha={alpha} must be positive")
        _check_nonnegative(type(self).__name__, balance_coef=balance_coef, bias_rate=bias_rate,
                           z_loss_coef=z_loss_coef)
        _check_hidden(type(self).__name__, mlp_hidden)
        self.alpha = alpha
        self.mlp_hidden = mlp_hidden
        self.balancing = balancing
        self.balance_coef = balance_coef
        self.bias_rate = bias_rate
        self.capacity_factor = capacity_factor
        self.z_loss_coef = z_loss_coef

    def _build(self, dim: int, num_steps: int) -> None:
        self.proj = _projection(dim, self.mlp_hidden, num_steps)
        # Selection-only bias of loss-free balancing: a buffer, so checkpoints carry it.
        self.register_buffer("depth_bias", torch.zeros(num_steps))
        self.register_buffer("suffix", torch.ones(num_steps, num_steps).tril(), persistent=False)
        # reaches[i, j]: a unit that chose depth index i takes step j (i >= j), when it fits.
        self.register_buffer("reaches", self.suffix.bool(), persistent=False)

    def compact(self, units: Units) -> bool:
        # Hierarchical: step j picks among the units that took step j - 1 (choice >= j implies
        # choice >= j - 1), by the carry decided up front. Steps that keep fewer than `kept`
        # units leave padding slots, taken units first.
        return units.full

    def gather_carry(self, carry: Any, index: Tensor) -> Any:
        return None if carry is None else gather_rows(carry, index)

    def reads_hidden(self, step: int) -> bool:
        return step == 0  # the later steps follow the carry decided there

    def _unpack(self, carry: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """logits (B, U, R), priority (B, U, R), gate (B, U)."""
        R = self.num_steps
        return carry[..., :R], carry[..., R:2 * R], carry[..., 2 * R]

    def _decide(self, hidden: Tensor, units: Units, active: Tensor | None, fused: bool):
        logits = units.pool(_score(self.proj, hidden))  # (B, U, R)
        if fused and not self.training:  # the carry below in one launch, no losses to compute
            return fused_routing.decide(logits, self.depth_bias, self.alpha), {}, {}
        probs = logits.softmax(-1)
        choice = (logits + self.depth_bias).argmax(-1)  # (B, U) in [0, R)
        gate = self.alpha * probs.gather(-1, choice[..., None]).squeeze(-1)
        # Priority of a unit at step j: probability that its depth is >= j + 1, a suffix sum
        # taken as a product with a triangular matrix (a cumsum over R = 4 entries ran as a scan
        # kernel of 0.29 ms per forward at the H200 video shape); fp32 whatever the autocast.
        with torch.autocast(probs.device.type, enabled=False):
            reach = probs @ self.suffix.to(probs.dtype)  # (B, U, R)
        # Units whose choice stops short of step j rank at -inf there: eligibility for every
        # step in one `where` here, instead of a comparison and a `where` at each step.
        priority = torch.where(self.reaches[choice], reach, float("-inf"))
        # One (B, U, 2R + 1) tensor (see _unpack): a compact backbone gathers it once per step.
        carry = torch.cat((logits, priority, gate[..., None]), -1)
        losses, stats = {}, {}
        if not self.training:  # balancing is a training concern: nothing to compute here
            return carry, losses, stats
        w = None if active is None else active.to(probs.dtype)  # units that exist; None: all
        R = probs.shape[-1]
        # One-hot by comparison: F.one_hot range-checks with .item() on non-CUDA devices (a sync).
        one_hot = (choice[..., None] == torch.arange(R, device=choice.device)).to(probs.dtype)
        load = _unit_mean(one_hot, w)
        if self.balancing == "loss" and self.balance_coef > 0:
            importance = _unit_mean(probs, w)
            losses["router_balance"] = self.balance_coef * R * (load.detach() * importance).sum()
        if self.z_loss_coef > 0:
            z = torch.logsumexp(logits, -1).square()
            losses["router_z"] = self.z_loss_coef * _weighted_mean(z, w)
        stats["load"] = load.detach()
        return carry, losses, stats

    def step_capacity(self, step: int) -> float:
        return min(1.0, self.capacities[step] * self.capacity_factor)

    def route(
        self, step: int, hidden: Tensor, units: Units, active: Tensor | None, carry: Any,
        scores: Tensor | None = None, fused: bool = False,
    ) -> Route:
        losses, stats = {}, {}
        if carry is None:
            carry, losses, stats = self._decide(hidden, units, active, fused)
        logits, priority, gate = self._unpack(carry)
        cap = self.step_capacity(step)
        kept = capacity_count(cap, units.population)  # <= the previous step's: capacities fall
        # Only the first step at full capacity is exact: every unit takes it.
        exact = units.full and step == 0 and cap >= 1.0
        index = taken = None
        if exact:
            selected = active
        else:
            # Full streams: every sample has all units, so the static `kept` is everyone's budget.
            budget = None
            if not units.full:
                budget = capacity_counts(cap, units.counts(active.shape[0], active.device))
            # Units whose choice stops short of this step have priority -inf (see _decide). The
            # compact loop needs no more: the units of its working set that did not take the
            # last step chose less depth still. The masked loop also drops those that overflowed
            # an earlier step (not `active`). Its (B, U) mask is for that loop alone; the compact
            # one reads index and taken.
            compact = self.compact(units)
            selected, index, taken = _select_top(None if compact else active, priority[..., step],
                                                 budget, kept, mask=not compact)
        return Route(
            selected=selected,
            gate=gate,
            logits=logits[..., step],
            kept=kept,
            exact=exact,
            losses=losses,
            stats=stats,
            carry=carry,
            index=index,
            taken=taken,
        )

    @torch.no_grad()
    def after_optimizer_step(self, stats: dict[str, Tensor]) -> None:
        if self.balancing != "loss_free" or "load" not in stats:
            return
        load = stats["load"].to(self.depth_bias.device)
        self.depth_bias += self.bias_rate * torch.sign(load.mean() - load)
