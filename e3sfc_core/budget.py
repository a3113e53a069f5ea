"""Communication budget scheduler: how many synthetic samples each round may use.

The user gives one hard byte budget for the whole run (uplink + downlink, catch-up
included). Before each round the server *forecasts* the rest of the run: which clients
each coming round samples (sampling is seeded), how many uplink payloads that makes,
how many times the downlink payload a round makes will be sent later (once to every
client that catches up with it) and the bytes no choice of ``n`` changes (replays of
payloads already made, full-weights re-syncs, every message's own fields). From that forecast
(:class:`Demand` per round) the scheduler

* takes the fixed bytes off what is left, keeps for every later round what it needs at
  the smallest ``n`` (``n_min`` per direction), and
* gives this round a share of the rest by a policy: ``constant`` (the same ``n`` every
  round), ``decay`` (round ``r`` weighs ``decay ** r``: early rounds, whose updates are
  large, get more) or ``adaptive`` (the constant share, split between the directions by
  a factor per direction that rises while its compression falls behind and falls while
  it keeps up);
* picks, per direction, the largest ``n`` whose payloads fit that share.

The last round gets everything left, so a run with enough rounds spends nearly all of
its budget; :meth:`BudgetScheduler.can_afford` is the hard check before sending. The
parameters are validated once, by :class:`~e3sfc_core.config.ExperimentConfig`.
Framework-free; the state is JSON-serialisable for server checkpoints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .errors import BudgetExhausted, ConfigError
from .payload import Direction

logger = logging.getLogger(__name__)

PolicyName = Literal["constant", "decay", "adaptive"]
SizeOf = Callable[[int], int]
_STATE_FORMAT = 2


@dataclass(frozen=True)
class BudgetParams:
    """The scheduler's settings (``total_bytes = 0``: unlimited, ``n_default`` every
    round). ``n_min_*`` bound each direction's samples from below, ``n_max`` both from
    above; ``decay`` is the ``decay`` policy's ratio; the rest tune ``adaptive``
    (see :func:`next_factor`)."""

    policy: PolicyName
    total_bytes: int
    num_rounds: int
    n_min_uplink: int = 2
    n_min_downlink: int = 2
    n_max: int = 16
    n_default: int = 2
    decay: float = 0.9
    cos_low: float = 0.3
    cos_high: float = 0.6
    residual_growth: float = 0.1
    accuracy_drop: float = 0.02
    adaptive_up: float = 1.25
    adaptive_down: float = 0.8
    factor_min: float = 0.5
    factor_max: float = 2.0

    def n_min(self, direction: Direction) -> int:
        """The smallest ``n`` a payload in ``direction`` may use."""
        return self.n_min_uplink if direction is Direction.UPLINK else self.n_min_downlink


@dataclass(frozen=True)
class Demand:
    """One coming round as the server foresees it.

    ``uplinks``: payloads its sampled clients send; ``deliveries``: how many times the
    downlink payload it makes will be sent in later rounds; ``fixed``: downlink bytes it
    sends whatever ``n`` is chosen (replays of payloads already made, full-weights
    re-syncs, the instructions' own fields); ``uplink_fixed``: the same for the uplink
    (the replies' own fields); ``per_delivery``: bytes each later delivery of the
    payload adds besides the payload (its length field in the instruction).
    """

    uplinks: int
    deliveries: int
    fixed: int = 0
    uplink_fixed: int = 0
    per_delivery: int = 0

    @property
    def fixed_total(self) -> int:
        """Bytes both directions send in this round whatever ``n`` is chosen."""
        return self.fixed + self.uplink_fixed

    @property
    def committed(self) -> int:
        """Bytes this round commits the run to whatever ``n`` is chosen, later
        deliveries' own fields included."""
        return self.fixed_total + self.deliveries * self.per_delivery

    def count(self, direction: Direction) -> int:
        """Payloads whose size this round's ``n`` in ``direction`` decides."""
        return self.uplinks if direction is Direction.UPLINK else self.deliveries

    def cost(self, size_of: SizeOf, n_uplink: int, n_downlink: int) -> int:
        """Bytes this round's choices commit the run to, fixed bytes included."""
        return self.committed + self.uplinks * size_of(n_uplink) + self.deliveries * size_of(n_downlink)


@dataclass(frozen=True)
class Feedback:
    """How well one direction's compression kept up in one round: the achieved
    |cosine| with the target and the error-feedback residual's norm relative to the
    fresh update's (``||r|| / ||d||``, averaged over the round's payloads). A residual
    that outgrows the update means compression falls behind."""

    cosine: float
    residual_ratio: float


@dataclass(frozen=True)
class RoundPlan:
    """One round's plan and what it spent. ``allowance``: bytes for this round's choices
    (its uplinks and the later deliveries of its downlink payload; ``None`` when
    unlimited); ``planned_*``: bytes the round itself was to send per direction (the
    downlink is the catch-up of payloads already made)."""

    round: int
    n_uplink: int
    n_downlink: int
    allowance: int | None = None
    planned_uplink: int = 0
    planned_downlink: int = 0
    spent_uplink: int = 0
    spent_downlink: int = 0

    def spent(self, direction: Direction) -> int:
        """Bytes this round recorded in ``direction``."""
        return self.spent_uplink if direction is Direction.UPLINK else self.spent_downlink

    def adding(self, direction: Direction, nbytes: int) -> RoundPlan:
        """This record with ``nbytes`` more spent in ``direction``."""
        if direction is Direction.UPLINK:
            return replace(self, spent_uplink=self.spent_uplink + nbytes)
        return replace(self, spent_downlink=self.spent_downlink + nbytes)


# --------------------------------------------------------------------------- policies


def _weights(params: BudgetParams, demands: Sequence[Demand]) -> list[float]:
    """Each coming round's weight: its payload count, times ``decay ** k`` for the k-th
    round from now under ``decay`` (so ``constant`` gives every round the same ``n``)."""
    d = params.decay if params.policy == "decay" else 1.0
    return [(x.uplinks + x.deliveries) * d**k for k, x in enumerate(demands)]


def shares(
    params: BudgetParams, free: int, demands: Sequence[Demand], factors: Mapping[Direction, float]
) -> dict[Direction, float]:
    """Bytes per direction for the first of ``demands`` out of ``free`` (what is left
    after every round's fixed bytes): the policy's weight of this round, split between
    the directions by payload count times each direction's factor (1.0 except under
    ``adaptive``). The factors move bytes between the round's two directions, not
    between rounds: front-loading (as ``decay`` does) lost accuracy in
    ``bench/results/budget.md``. The last round gets everything."""
    weights = _weights(params, demands)
    total_weight = math.fsum(weights)
    now = demands[0]
    payloads = now.uplinks + now.deliveries
    if total_weight <= 0 or payloads == 0:
        return {d: 0.0 for d in Direction}
    share = free * weights[0] / total_weight
    weight = {d: now.count(d) * factors[d] for d in Direction}
    return {d: share * weight[d] / math.fsum(weight.values()) for d in Direction}


def mean_feedback(seen: Sequence[Feedback]) -> Feedback | None:
    """The round's feedback in one direction, averaged over its payloads."""
    if not seen:
        return None
    n = len(seen)
    return Feedback(math.fsum(f.cosine for f in seen) / n, math.fsum(f.residual_ratio for f in seen) / n)


def next_factor(
    params: BudgetParams,
    factor: float,
    now: Feedback | None,
    before: Feedback | None,
    accuracy_change: float | None,
) -> float:
    """``adaptive``'s factor for one direction after a round with feedback ``now``
    (``before``: the previous round's).

    The residual ratio grows over any run as the updates shrink, so its level says
    little; its growth does. Up a step (more samples) when compression falls behind:
    the cosine is below ``cos_low``, the residual ratio grew by more than
    ``residual_growth``, or accuracy fell by more than ``accuracy_drop``. Down a step
    when it keeps up: cosine above ``cos_high``, the residual ratio shrinking and
    accuracy not falling. Otherwise one step back towards 1. Clamped to the range."""
    if now is None:
        return factor
    fell = accuracy_change is not None and accuracy_change < -params.accuracy_drop
    growth = now.residual_ratio / before.residual_ratio - 1.0 if before and before.residual_ratio > 0 else 0.0
    if now.cosine < params.cos_low or growth > params.residual_growth or fell:
        factor *= params.adaptive_up
    elif now.cosine > params.cos_high and growth < 0.0:
        factor *= params.adaptive_down
    elif factor > 1.0:
        factor = max(1.0, factor * params.adaptive_down)
    elif factor < 1.0:
        factor = min(1.0, factor * params.adaptive_up)
    return min(params.factor_max, max(params.factor_min, factor))


def largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Largest integer in ``[lo, hi]`` for which the monotone ``fits`` holds (binary
    search), or ``None`` when even ``lo`` does not fit."""
    if not fits(lo):
        return None
    while lo < hi:  # invariant: fits(lo)
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def rounds_affordable(
    params: BudgetParams, demands: Sequence[Demand], size_of: SizeOf, remaining: int
) -> int:
    """How many of the coming rounds ``remaining`` bytes pay for at the smallest ``n``
    (each round's cost includes the later deliveries of its downlink payload)."""
    spent = 0
    for k, demand in enumerate(demands):
        spent += demand.cost(size_of, params.n_min_uplink, params.n_min_downlink)
        if spent > remaining:
            return k
    return len(demands)


def _spent_v1(row: Mapping[str, Any]) -> RoundPlan:
    """A round of a format-1 state (its plan had no sample counts): what it spent."""
    try:
        r, up, down = int(row["round"]), int(row["uplink"]), int(row["downlink"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed budget state: {exc!r}") from exc
    return RoundPlan(r, 0, 0, spent_uplink=up, spent_downlink=down)


# -------------------------------------------------------------------------- scheduler


@dataclass
class BudgetScheduler:
    """Plans each round's sample counts under a hard total and records what was spent.

    Rounds are 1-based. ``factors`` (per direction, ``adaptive`` only) and
    ``accuracies`` are public state that the policies read; ``plans`` holds every
    planned round's :class:`RoundPlan`.
    """

    params: BudgetParams
    factors: dict[Direction, float] = field(default_factory=lambda: {d: 1.0 for d in Direction})
    plans: dict[int, RoundPlan] = field(default_factory=dict)
    accuracies: list[float] = field(default_factory=list)
    pending: dict[Direction, list[Feedback]] = field(default_factory=lambda: {d: [] for d in Direction})
    last: dict[Direction, Feedback] = field(default_factory=dict)
    current_round: int = 0
    warned_short: bool = field(default=False, repr=False)  # the run-too-short warning, once

    @property
    def unlimited(self) -> bool:
        """True when ``total_bytes == 0``."""
        return self.params.total_bytes == 0

    def spent(self, direction: Direction | None = None) -> int:
        """Bytes recorded so far in ``direction`` (both when ``None``)."""
        dirs = list(Direction) if direction is None else [direction]
        return sum(p.spent(d) for p in self.plans.values() for d in dirs)

    def remaining(self) -> int | None:
        """Bytes still spendable (never negative); ``None`` when unlimited."""
        return None if self.unlimited else max(0, self.params.total_bytes - self.spent())

    def can_afford(self, nbytes: int) -> bool:
        """Whether sending ``nbytes`` more keeps the run within its total (the hard check)."""
        return self.unlimited or nbytes == 0 or self.spent() + nbytes <= self.params.total_bytes

    # --------------------------------------------------------------------- planning

    def plan_round(self, server_round: int, demands: Sequence[Demand], size_of: SizeOf) -> RoundPlan:
        """Fix round ``server_round``'s sample counts from the forecast ``demands`` (this
        round first, then every later one); idempotent within a round.

        ``size_of(n)`` is one payload's size with ``n`` samples (non-decreasing in ``n``).

        Raises
        ------
        BudgetExhausted
            When this round's fixed bytes and its uplinks at ``n_min`` no longer fit.
        """
        if server_round in self.plans:
            self.current_round = server_round
            return self.plans[server_round]
        p = self.params
        if self.unlimited:  # the lower bounds apply to budgeted runs only
            return self._keep(RoundPlan(server_round, p.n_default, p.n_default))
        now = demands[0]
        remaining = self.remaining() or 0
        needed = now.fixed_total + now.uplinks * size_of(p.n_min_uplink)
        if needed > remaining:
            raise BudgetExhausted(
                f"round {server_round} needs {needed} bytes at n = {p.n_min_uplink}, {remaining} left"
            )
        self._warn_if_short(server_round, demands, size_of, remaining)
        self._update_factors()
        free = remaining - sum(x.committed for x in demands)
        later = sum(x.cost(size_of, p.n_min_uplink, p.n_min_downlink) - x.committed for x in demands[1:])
        share = shares(p, free, demands, self.factors)
        cap = max(0, free - later)
        scale = min(1.0, cap / sum(share.values())) if sum(share.values()) > 0 else 1.0
        n = {d: self._largest_n(d, now.count(d), share[d] * scale, size_of) for d in Direction}
        for d, other in ((Direction.UPLINK, Direction.DOWNLINK), (Direction.DOWNLINK, Direction.UPLINK)):
            room = cap - now.count(other) * size_of(n[other])  # the other may sit at n_min
            n[d] = min(n[d], self._largest_n(d, now.count(d), room, size_of))
        plan = RoundPlan(
            server_round,
            n[Direction.UPLINK],
            n[Direction.DOWNLINK],
            allowance=math.floor(sum(share.values()) * scale),
            planned_uplink=now.uplink_fixed + now.uplinks * size_of(n[Direction.UPLINK]),
            planned_downlink=now.fixed,
        )
        logger.info(
            "budget round %d: n %d/%d, allowance %d bytes of %d left (policy %s, factors %.2f/%.2f)",
            server_round,
            plan.n_uplink,
            plan.n_downlink,
            plan.allowance,
            remaining,
            p.policy,
            self.factors[Direction.UPLINK],
            self.factors[Direction.DOWNLINK],
        )
        return self._keep(plan)

    def _warn_if_short(
        self, server_round: int, demands: Sequence[Demand], size_of: SizeOf, remaining: int
    ) -> None:
        """Say once, as early as it is known, that the budget cannot pay for every
        coming round even at ``n_min``, and how far it surely reaches: the run will stop
        early."""
        if self.warned_short:
            return
        fit = rounds_affordable(self.params, demands, size_of, remaining)
        if fit >= len(demands):
            return
        self.warned_short = True
        p = self.params
        logger.warning(
            "budget: %d bytes left pay for at least rounds %d to %d of %d at n = %d/%d "
            "(uplink/downlink; the forecast is an upper bound): the run will stop early unless "
            "budget-total-bytes is raised or budget-n-min-* lowered",
            remaining,
            server_round,
            server_round + fit - 1,
            server_round + len(demands) - 1,
            p.n_min_uplink,
            p.n_min_downlink,
        )

    def _keep(self, plan: RoundPlan) -> RoundPlan:
        self.plans[plan.round] = plan
        self.current_round = plan.round
        return plan

    def _largest_n(self, direction: Direction, count: int, allowance: float, size_of: SizeOf) -> int:
        """Largest ``n`` whose ``count`` payloads fit ``allowance`` (``n_max`` when no
        payload is sent, ``n_min`` when none fits: refusing is :meth:`can_afford`'s job)."""
        lo, hi = self.params.n_min(direction), self.params.n_max
        n = largest_fitting(lambda k: count * size_of(k) <= allowance, lo, hi)
        return lo if n is None else n

    def _update_factors(self) -> None:
        """Apply the feedback seen since the last plan (``adaptive`` only)."""
        acc = self.accuracies
        change = acc[-1] - acc[-2] if len(acc) >= 2 else None
        for d in Direction:
            now = mean_feedback(self.pending[d])
            if self.params.policy == "adaptive":
                self.factors[d] = next_factor(self.params, self.factors[d], now, self.last.get(d), change)
            if now is not None:
                self.last[d] = now
        self.pending = {d: [] for d in Direction}

    # ---------------------------------------------------------------------- updates

    def spend(self, direction: Direction, nbytes: int, *, force: bool = False) -> None:
        """Record ``nbytes`` that moved in ``direction`` in the current round.

        Raises :class:`BudgetExhausted` without recording if the total would be exceeded;
        ``force=True`` records bytes that already arrived anyway (with a warning): a
        report that hid them would lie."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if not self.can_afford(nbytes):
            msg = (
                f"{direction.name.lower()} of {nbytes} bytes in round {self.current_round} exceeds "
                f"the budget: spent {self.spent()}, total {self.params.total_bytes}"
            )
            if not force:
                raise BudgetExhausted(msg)
            logger.warning("recording anyway (force): %s", msg)
        r = self.current_round
        plan = self.plans.get(r) or RoundPlan(r, 0, 0)
        self.plans[r] = plan.adding(direction, nbytes)

    def observe(self, direction: Direction, feedback: Feedback) -> None:
        """Keep one direction's feedback for the next plan (non-finite values are
        ignored with a warning, so a degenerate target cannot poison the schedule)."""
        if math.isfinite(feedback.cosine) and math.isfinite(feedback.residual_ratio):
            self.pending[direction].append(feedback)
        else:
            logger.warning("ignoring non-finite %s feedback %r", direction.name.lower(), feedback)

    def observe_accuracy(self, accuracy: float) -> None:
        """The global model's accuracy after the current round (its change is a signal)."""
        if math.isfinite(accuracy):
            self.accuracies = [*self.accuracies[-1:], accuracy]

    # ---------------------------------------------------------------- report, state

    def report(self) -> dict[str, Any]:
        """Totals, and per round its ``n`` and planned vs spent bytes per direction."""
        return {
            "policy": self.params.policy,
            "total": self.params.total_bytes,
            "unlimited": self.unlimited,
            "spent_uplink": self.spent(Direction.UPLINK),
            "spent_downlink": self.spent(Direction.DOWNLINK),
            "spent_total": self.spent(),
            "remaining": self.remaining(),
            "factors": {d.name.lower(): f for d, f in self.factors.items()},
            "rounds": [asdict(self.plans[r]) for r in sorted(self.plans)],
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything but the parameters needed to resume, JSON-serialisable."""
        return {
            "format": _STATE_FORMAT,
            "factors": {d.name.lower(): f for d, f in self.factors.items()},
            "plans": [asdict(self.plans[r]) for r in sorted(self.plans)],
            "accuracies": list(self.accuracies),
            "pending": {d.name.lower(): [asdict(f) for f in fs] for d, fs in self.pending.items()},
            "last": {d.name.lower(): asdict(f) for d, f in self.last.items()},
            "current_round": self.current_round,
        }

    @classmethod
    def from_state_dict(cls, params: BudgetParams, state: Mapping[str, Any]) -> BudgetScheduler:
        """A scheduler with ``params`` (from the run's config) resumed at ``state``
        (a format-1 state, from before the forecast, keeps only what each round spent)."""
        if isinstance(state, Mapping) and state.get("format") == 1:
            return cls(params, plans={r.round: r for r in map(_spent_v1, state.get("rounds", []))})
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            fmt = state.get("format") if isinstance(state, Mapping) else None
            raise ConfigError(f"budget state format must be {_STATE_FORMAT}, got {fmt!r}")
        try:
            return cls(
                params,
                factors={Direction[k.upper()]: float(v) for k, v in state["factors"].items()},
                plans={int(p["round"]): RoundPlan(**p) for p in state["plans"]},
                accuracies=[float(a) for a in state["accuracies"]],
                pending={
                    Direction[k.upper()]: [Feedback(**f) for f in v] for k, v in state["pending"].items()
                },
                last={Direction[k.upper()]: Feedback(**f) for k, f in state["last"].items()},
                current_round=int(state["current_round"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"malformed budget state: {exc!r}") from exc
