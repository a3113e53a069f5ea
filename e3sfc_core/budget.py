"""Communication budget scheduler: how many synthetic samples each round may use.

The user gives one hard byte budget for the whole run (uplink + downlink, catch-up
traffic included). Each round the scheduler *plans* an allowance (bytes for both
directions together) from what is left, following a policy:

* ``constant``: every remaining round gets an equal share of what is left;
* ``decay``: round ``r`` weighs ``decay ** (r - 1)``, so early rounds, whose updates are
  large and most informative, get more (never more than the previous round's plan);
* ``adaptive``: the constant share times a factor in ``[0.25, 4]`` that goes up when the
  achieved compression error was high (low cosine or large residual) and down when it
  was low.

3SFC payloads cost ``size_of(n) = fixed + n * per_sample`` bytes, known beforehand, so
:meth:`BudgetScheduler.choose_samples` picks the largest ``n`` whose payloads fit the
round's allowance. Baselines have a fixed size; for them the scheduler only accounts
(:meth:`~BudgetScheduler.spend`) and refuses what does not fit
(:meth:`~BudgetScheduler.can_afford`). The hard rule "never exceed the total" is enforced
by ``can_afford`` before sending; ``spend(..., force=True)`` still records bytes that
already moved, because a report that hides them would lie.

Typical server flow for round ``r`` (``sched = BudgetScheduler(cfg.budget_params())``)::

    sched.plan_round(r)                       # fixes this round's allowance
    n_down = sched.choose_samples(r, payload_count=m, size_of=size_of)
    if sched.can_afford(down_bytes): ...send...; sched.spend(Direction.DOWNLINK, down_bytes)
    ...receive...;                             sched.spend(Direction.UPLINK, up_bytes, force=True)
    sched.observe(Direction.UPLINK, BudgetFeedback(cosine, residual_ratio))

Framework-free: no flwr import; state is JSON-serialisable for server checkpoints.
"""

from __future__ import annotations

import enum
import logging
import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import BudgetExhausted, ConfigError
from .payload import Direction

logger = logging.getLogger(__name__)

DIRECTIONS: tuple[Direction, ...] = (Direction.UPLINK, Direction.DOWNLINK)
FACTOR_MIN = 0.25
FACTOR_MAX = 4.0
N_LIMIT = 65535  # the synthetic payload stores n as u16
_STATE_FORMAT = 1


@dataclass(frozen=True)
class BudgetFeedback:
    """How well one direction's payloads matched their targets in one round.

    ``cosine`` is the achieved |cosine| between target and transmitted update and
    ``residual_ratio`` is ||residual|| / ||target||, both averaged over the round's
    payloads in that direction. Only ``adaptive`` acts on it.
    """

    cosine: float
    residual_ratio: float


@dataclass(frozen=True)
class Observation:
    """One direction's feedback, waiting for the next plan."""

    direction: Direction
    cosine: float
    residual_ratio: float


@dataclass(frozen=True)
class RoundBudget:
    """One round's planned allowance (``None``: not planned, or unlimited) and the bytes
    it spent per direction."""

    planned: float | None = None
    uplink: int = 0
    downlink: int = 0

    @property
    def spent(self) -> int:
        """Bytes of both directions."""
        return self.uplink + self.downlink

    def adding(self, direction: Direction, nbytes: int) -> RoundBudget:
        """This record with ``nbytes`` more spent in ``direction``."""
        if direction is Direction.UPLINK:
            return replace(self, uplink=self.uplink + nbytes)
        return replace(self, downlink=self.downlink + nbytes)


# ---------------------------------------------------------------------------
# Policies: name -> allowance(scheduler, server_round, remaining, factor) -> bytes.
# ``factor`` is the adaptive multiplier (always 1.0 for non-adaptive policies).
# ---------------------------------------------------------------------------


def _rounds_left(sched: BudgetScheduler, server_round: int) -> int:
    """Rounds still to pay for, this one included (at least 1 past the planned end)."""
    return max(1, sched.params.num_rounds - server_round + 1)


def _constant(sched: BudgetScheduler, server_round: int, remaining: int, factor: float) -> float:
    """Equal share of what is left for every remaining round."""
    return remaining / _rounds_left(sched, server_round)


def _decay(sched: BudgetScheduler, server_round: int, remaining: int, factor: float) -> float:
    """Share ``w_r / sum_{j=r..R} w_j`` with ``w_r = decay ** (r - 1)``.

    The ratio is computed as ``1 / sum_{k=0..left-1} decay ** k`` so that late rounds of
    long runs do not underflow; if every round spends its plan, allowances fall
    geometrically by ``decay``. Bytes a round leaves unspent would otherwise pile up on
    the last rounds (whose share tends to everything left), so the allowance is also
    capped at the previous planned round's: early rounds never get less than later ones.
    """
    left = _rounds_left(sched, server_round)
    d = sched.params.decay
    denom = float(left) if d == 1.0 else (1.0 - d**left) / (1.0 - d)
    share = remaining / denom
    previous = sched.planned_before(server_round)
    return share if previous is None else min(share, previous)


def _adaptive(sched: BudgetScheduler, server_round: int, remaining: int, factor: float) -> float:
    """Constant share scaled by the feedback factor, never more than what is left."""
    return min(float(remaining), factor * _constant(sched, server_round, remaining, factor))


POLICIES: dict[str, Callable[[BudgetScheduler, int, int, float], float]] = {
    "constant": _constant,
    "decay": _decay,
    "adaptive": _adaptive,
}
# Policies whose allowance reads the feedback factor; the others keep it at 1.0.
FEEDBACK_POLICIES: frozenset[str] = frozenset({"adaptive"})


def _as_int(name: str, value: Any, minimum: int, maximum: int | None = None, note: str = "") -> int:
    """Coerce an int-like config value and check its range (bools and floats refused)."""
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    try:
        if isinstance(value, bool):
            raise TypeError
        ivalue = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an int {allowed}{note}, got {value!r}") from None
    if ivalue < minimum or (maximum is not None and ivalue > maximum):
        raise ConfigError(f"{name} must be an int {allowed}{note}, got {ivalue}")
    return ivalue


def _as_float(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    """Coerce a finite float config value and check it lies in the given interval."""
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    try:
        if isinstance(value, bool):
            raise TypeError
        fvalue = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}") from None
    ok = (
        math.isfinite(fvalue)
        and (fvalue > lo if lo_open else fvalue >= lo)
        and (fvalue < hi if hi_open else fvalue <= hi)
    )
    if not ok:
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")
    return fvalue


def _direction(direction: Any) -> Direction:
    """A :class:`Direction` from itself or its name (``"uplink"``/``"downlink"``, as
    callers and saved states write it)."""
    if isinstance(direction, Direction):
        return direction
    name = direction.name if isinstance(direction, enum.Enum) else direction
    if not isinstance(name, str) or name.upper() not in Direction.__members__:
        raise ValueError(f"direction must be one of {[d.name.lower() for d in Direction]}, got {direction!r}")
    return Direction[name.upper()]


def _name(direction: Direction) -> str:
    """``"uplink"`` / ``"downlink"``: how reports, logs and saved states name it."""
    return direction.name.lower()


def _nonneg_int(name: str, value: Any) -> int:
    """Byte counts and similar call arguments: int >= 0 (TypeError / ValueError otherwise)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int >= 0, got {value!r}")
    ivalue = operator.index(value)
    if ivalue < 0:
        raise ValueError(f"{name} must be an int >= 0, got {ivalue}")
    return ivalue


def _check_round(server_round: Any) -> int:
    """Flower rounds start at 1."""
    if isinstance(server_round, bool) or not hasattr(server_round, "__index__"):
        raise TypeError(f"server_round must be an int >= 1, got {server_round!r}")
    r = operator.index(server_round)
    if r < 1:
        raise ValueError(f"server_round must be an int >= 1, got {r}")
    return r


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


@dataclass(frozen=True)
class BudgetParams:
    """The scheduler's settings, checked once, here, when they are built (by
    :meth:`e3sfc_core.config.ExperimentConfig.budget_params` for a run).

    ``total_bytes = 0`` means unlimited. ``n_min``/``n_max`` bound the samples per
    payload and ``n_default`` is used when unlimited. ``decay`` is the ``decay`` policy's
    ratio; ``cos_low``/``cos_high``/``residual_high`` are the ``adaptive`` policy's
    thresholds and ``adaptive_up``/``adaptive_down`` its steps.
    """

    policy: str
    total_bytes: int
    num_rounds: int
    n_min: int = 1
    n_max: int = 64
    n_default: int = 1
    decay: float = 0.9
    cos_low: float = 0.3
    cos_high: float = 0.6
    residual_high: float = 0.95
    adaptive_up: float = 1.25
    adaptive_down: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        n_min = _as_int("n_min", self.n_min, 1, N_LIMIT)
        cos_low = _as_float("cos_low", self.cos_low, 0.0, 1.0, False, False)
        checked = {
            "total_bytes": _as_int("total_bytes", self.total_bytes, 0, note=" (0 = unlimited)"),
            "num_rounds": _as_int("num_rounds", self.num_rounds, 1),
            "n_min": n_min,
            "n_max": _as_int("n_max", self.n_max, n_min, N_LIMIT, note=" (n_min..u16 max)"),
            "n_default": _as_int("n_default", self.n_default, 1, N_LIMIT),
            "decay": _as_float("decay", self.decay, 0.0, 1.0, True, False),
            "cos_low": cos_low,
            "cos_high": _as_float("cos_high", self.cos_high, cos_low, 1.0, False, False),
            "residual_high": _as_float("residual_high", self.residual_high, 0.0, math.inf, True, True),
            "adaptive_up": _as_float("adaptive_up", self.adaptive_up, 1.0, FACTOR_MAX, False, False),
            "adaptive_down": _as_float("adaptive_down", self.adaptive_down, 0.0, 1.0, True, False),
        }
        for name, value in checked.items():  # coerced values (e.g. numpy ints) on a frozen object
            object.__setattr__(self, name, value)


@dataclass
class BudgetScheduler:
    """Plans per-round byte allowances under a hard total and records what was spent.

    ``params.total_bytes = 0`` means unlimited: allowances are ``None``, every send is
    affordable and :meth:`choose_samples` returns ``n_default``. Rounds are 1-based;
    a round ``r > num_rounds`` (an extended run) may use everything that is left.
    """

    params: BudgetParams

    _spent: dict[Direction, int] = field(init=False, repr=False)
    _factor: float = field(init=False, repr=False, default=1.0)
    # feedback observed since the last plan_round
    _pending: list[Observation] = field(init=False, repr=False)
    _last_feedback: dict[Direction, BudgetFeedback] = field(init=False, repr=False)
    # round -> its plan and spending; round 0 holds traffic recorded before any round
    # was planned (e.g. an initial broadcast).
    _rounds: dict[int, RoundBudget] = field(init=False, repr=False)
    _current_round: int = field(init=False, repr=False, default=0)
    # bytes of the cheapest possible round, kept in reserve for every later round
    _round_floor: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        self._spent = {d: 0 for d in DIRECTIONS}
        self._factor = 1.0
        self._pending = []
        self._last_feedback = {}
        self._rounds = {}
        self._current_round = 0
        self._round_floor = 0

    def reserve_round_floor(self, nbytes: int) -> None:
        """Keep ``nbytes`` (the cheapest possible round) for each round after the one
        being planned, so that generous early rounds cannot starve the last ones.

        Set by the caller, which knows the payload sizes; not part of the saved state
        (the caller sets it again after a restore)."""
        self._round_floor = _nonneg_int("nbytes", nbytes)

    # ------------------------------------------------------------------ queries

    @property
    def unlimited(self) -> bool:
        """True when ``total_bytes == 0``."""
        return self.params.total_bytes == 0

    @property
    def spent_total(self) -> int:
        """Bytes recorded so far in both directions (may exceed the total after force)."""
        return self._spent[Direction.UPLINK] + self._spent[Direction.DOWNLINK]

    @property
    def factor(self) -> float:
        """The adaptive multiplier in force for the latest planned round (1.0 otherwise)."""
        return self._factor

    @property
    def last_feedback(self) -> dict[Direction, BudgetFeedback]:
        """Most recent feedback per direction (kept for every policy, for reporting)."""
        return dict(self._last_feedback)

    def remaining(self) -> int | None:
        """Bytes still spendable (never negative); ``None`` when unlimited."""
        if self.unlimited:
            return None
        return max(0, self.params.total_bytes - self.spent_total)

    def can_afford(self, nbytes: int) -> bool:
        """Whether sending ``nbytes`` more keeps the run within its total: the hard check.

        Zero bytes are always affordable, even after a forced overspend.
        """
        nbytes = _nonneg_int("nbytes", nbytes)
        if self.unlimited or nbytes == 0:
            return True
        return self.spent_total + nbytes <= self.params.total_bytes

    def _next_factor(self) -> float:
        """The factor the next plan will use, from feedback observed since the last plan.

        Feedback of both directions is averaged, so the factor moves at most one step per
        round however many observations arrived.
        """
        if self.params.policy not in FEEDBACK_POLICIES or not self._pending:
            return self._factor
        cos = math.fsum(p.cosine for p in self._pending) / len(self._pending)
        res = math.fsum(p.residual_ratio for p in self._pending) / len(self._pending)
        factor = self._factor
        if cos < self.params.cos_low or res > self.params.residual_high:
            factor *= self.params.adaptive_up  # compression error is high: buy more samples
        elif cos > self.params.cos_high:
            factor *= self.params.adaptive_down  # already accurate: save bytes for later
        return min(FACTOR_MAX, max(FACTOR_MIN, factor))

    def planned_before(self, server_round: int) -> float | None:
        """The plan of the latest planned round before ``server_round`` (None if none)."""
        earlier = [r for r, rec in self._rounds.items() if r < server_round and rec.planned is not None]
        return self._rounds[max(earlier)].planned if earlier else None

    def round_allowance(self, server_round: int) -> float | None:
        """Bytes round ``server_round`` may spend in both directions together.

        A planned round returns its fixed plan; otherwise the value the plan would get if
        the round started now (no state change). ``None`` when unlimited.
        """
        r = _check_round(server_round)
        if self.unlimited:
            return None
        rec = self._rounds.get(r)
        if rec is not None and rec.planned is not None:
            return rec.planned
        remaining = self.remaining()
        assert remaining is not None
        allowance = POLICIES[self.params.policy](self, r, remaining, self._next_factor())
        later_rounds = max(0, self.params.num_rounds - r)
        reserve_cap = max(float(self._round_floor), float(remaining - self._round_floor * later_rounds))
        return max(0.0, min(float(remaining), allowance, reserve_cap))

    def choose_samples(
        self,
        server_round: int,
        *,
        payload_count: int,
        size_of: Callable[[int], int],
        share: float = 0.5,
        reserved: int = 0,
    ) -> int:
        """Largest ``n`` in ``[n_min, n_max]`` with
        ``reserved + payload_count * size_of(n) <= share * round_allowance``.

        ``share`` is the part of the round's allowance for this direction (0.5 = half for
        downlink, half for uplink); ``reserved`` is bytes of the same part already
        committed (e.g. catch-up re-syncs). Returns ``n_default`` (clamped) when unlimited
        and ``n_min`` when even that does not fit: refusing is :meth:`can_afford`'s job.
        ``size_of`` must be non-decreasing in ``n``. Reads state only.
        """
        r = _check_round(server_round)
        payload_count = _nonneg_int("payload_count", payload_count)
        reserved = _nonneg_int("reserved", reserved)
        if not (isinstance(share, (int, float)) and 0.0 < share <= 1.0):
            raise ValueError(f"share must be a number in (0, 1], got {share!r}")
        allowance = self.round_allowance(r)
        if allowance is None:
            return min(self.params.n_max, max(self.params.n_min, self.params.n_default))
        cap = share * allowance

        def fits(n: int) -> bool:
            return reserved + payload_count * int(size_of(n)) <= cap

        n = largest_fitting(fits, self.params.n_min, self.params.n_max)
        if n is None:
            logger.debug("round %d: n_min=%d does not fit %.0f bytes", r, self.params.n_min, cap)
            return self.params.n_min
        logger.debug("round %d: n=%d for %d payloads within %.0f bytes", r, n, payload_count, cap)
        return n

    # ------------------------------------------------------------------ updates

    def plan_round(self, server_round: int) -> float | None:
        """Fix round ``server_round``'s allowance from what is left now; idempotent.

        Call it at the start of each round, before spending: it applies the feedback
        observed since the previous plan and makes later spending default to this round.
        Returns the allowance (``None`` when unlimited).
        """
        r = _check_round(server_round)
        rec = self._rounds.get(r)
        if rec is not None and (rec.planned is not None or self.unlimited):
            self._current_round = r
            return None if self.unlimited else rec.planned
        allowance = self.round_allowance(r)
        self._factor = self._next_factor()
        self._pending = []
        self._rounds[r] = replace(rec or RoundBudget(), planned=allowance)
        self._current_round = r
        if allowance is None:
            logger.debug("budget round %d: unlimited (policy %s)", r, self.params.policy)
        else:
            logger.info(
                "budget round %d: planned %.0f bytes of %d remaining (policy %s, factor %.3f)",
                r,
                allowance,
                self.remaining(),
                self.params.policy,
                self._factor,
            )
        return allowance

    def spend(
        self,
        direction: Direction | str,
        nbytes: int,
        *,
        server_round: int | None = None,
        force: bool = False,
    ) -> None:
        """Record ``nbytes`` that moved in ``direction`` (a :class:`Direction` or its name).

        Charged to ``server_round`` (planned first if it was not) or else to the latest
        planned round (round 0 before any). Raises :class:`BudgetExhausted` without
        recording if the total would be exceeded; with ``force=True`` bytes that already
        arrived are recorded anyway and a warning is logged.
        """
        d = _direction(direction)
        nbytes = _nonneg_int("nbytes", nbytes)
        if server_round is not None:
            r = _check_round(server_round)
            if r not in self._rounds:
                self.plan_round(r)
        else:
            r = self._current_round
        if not self.can_afford(nbytes):
            msg = (
                f"{_name(d)} of {nbytes} bytes in round {r} exceeds the budget: spent "
                f"{self.spent_total}, asked {nbytes}, total {self.params.total_bytes}"
            )
            if not force:
                raise BudgetExhausted(msg)
            logger.warning("recording anyway (force): %s", msg)
        self._rounds[r] = self._rounds.get(r, RoundBudget()).adding(d, nbytes)
        self._spent[d] += nbytes

    def observe(self, direction: Direction | str, feedback: BudgetFeedback) -> None:
        """Record a round's achieved accuracy in one direction for the next plan.

        Non-finite values (e.g. from an all-zero target) are ignored with a warning, so a
        degenerate client cannot poison the schedule.
        """
        d = _direction(direction)
        cos, res = float(feedback.cosine), float(feedback.residual_ratio)
        if not (math.isfinite(cos) and math.isfinite(res)):
            logger.warning("ignoring non-finite %s feedback %r", _name(d), feedback)
            return
        self._last_feedback[d] = BudgetFeedback(cos, res)
        self._pending.append(Observation(d, cos, res))

    # ------------------------------------------------------------------ reporting

    def report(self) -> dict[str, Any]:
        """Totals and per-round planned vs spent bytes (planned floored to whole bytes)."""
        rounds = []
        for r in sorted(self._rounds):
            rec = self._rounds[r]
            rounds.append(
                {
                    "round": r,
                    "planned": None if rec.planned is None else math.floor(rec.planned),
                    "spent": rec.spent,
                    "spent_uplink": rec.uplink,
                    "spent_downlink": rec.downlink,
                }
            )
        return {
            "policy": self.params.policy,
            "total": self.params.total_bytes,
            "unlimited": self.unlimited,
            "spent_uplink": self._spent[Direction.UPLINK],
            "spent_downlink": self._spent[Direction.DOWNLINK],
            "spent_total": self.spent_total,
            "remaining": self.remaining(),
            "overspent": 0 if self.unlimited else max(0, self.spent_total - self.params.total_bytes),
            "factor": self._factor,
            "rounds": rounds,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-serialisable values only."""
        return {
            "format": _STATE_FORMAT,
            "config": asdict(self.params),
            "spent_uplink": self._spent[Direction.UPLINK],
            "spent_downlink": self._spent[Direction.DOWNLINK],
            "factor": self._factor,
            "current_round": self._current_round,
            "pending": [[_name(p.direction), p.cosine, p.residual_ratio] for p in self._pending],
            "last_feedback": {
                _name(d): [fb.cosine, fb.residual_ratio] for d, fb in self._last_feedback.items()
            },
            "rounds": [
                {"round": r, "planned": rec.planned, "uplink": rec.uplink, "downlink": rec.downlink}
                for r, rec in sorted(self._rounds.items())
            ],
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> BudgetScheduler:
        """Rebuild a scheduler from :meth:`state_dict` output (also after a JSON trip)."""
        if not isinstance(d, dict) or d.get("format") != _STATE_FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else None
            raise ConfigError(f"budget state format must be {_STATE_FORMAT}, got {fmt!r}")
        try:
            sched = cls(BudgetParams(**d["config"]))
            spent = {
                Direction.UPLINK: _nonneg_int("spent_uplink", d["spent_uplink"]),
                Direction.DOWNLINK: _nonneg_int("spent_downlink", d["spent_downlink"]),
            }
            factor = float(d["factor"])
            if not FACTOR_MIN <= factor <= FACTOR_MAX:
                raise ValueError(f"factor must be in [{FACTOR_MIN}, {FACTOR_MAX}], got {factor}")
            current = _nonneg_int("current_round", d["current_round"])
            pending = [Observation(_direction(p[0]), float(p[1]), float(p[2])) for p in d["pending"]]
            last = {
                _direction(k): BudgetFeedback(float(v[0]), float(v[1])) for k, v in d["last_feedback"].items()
            }
            rounds: dict[int, RoundBudget] = {}
            for rec in d["rounds"]:
                planned = rec["planned"]
                rounds[_nonneg_int("round", rec["round"])] = RoundBudget(
                    planned=None if planned is None else float(planned),
                    uplink=_nonneg_int("uplink", rec["uplink"]),
                    downlink=_nonneg_int("downlink", rec["downlink"]),
                )
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"malformed budget state: {exc}") from exc
        sched._spent = spent
        sched._factor = factor
        sched._current_round = current
        sched._pending = pending
        sched._last_feedback = last
        sched._rounds = rounds
        return sched
