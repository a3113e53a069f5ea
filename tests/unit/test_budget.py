"""Budget scheduler: bounds, policies, planned catch-up, feedback, hard total, state."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e3sfc_core.budget import (
    BudgetParams,
    BudgetScheduler,
    Demand,
    Feedback,
    RoundPlan,
    largest_fitting,
    next_factor,
    rounds_affordable,
)
from e3sfc_core.errors import BudgetExhausted, ConfigError
from e3sfc_core.payload import Direction

POLICIES = ("constant", "decay", "adaptive")
UP, DOWN = Direction.UPLINK, Direction.DOWNLINK
K = 10  # clients per round


def make(policy: str, total: int, rounds: int, **kw: Any) -> BudgetScheduler:
    """A fresh scheduler (``n_min`` 1 both ways unless given)."""
    kw = {"n_min_uplink": 1, "n_min_downlink": 1, "n_max": 64, **kw}
    return BudgetScheduler(BudgetParams(policy, total, rounds, **kw))  # type: ignore[arg-type]


def size_of(n: int) -> int:
    return 40 + 300 * n


def federation(
    sched: BudgetScheduler,
    *,
    clients: int = K,
    size: Callable[[int], int] = size_of,
    extra: dict[int, int] | None = None,
    feedback: Callable[[int], tuple[Feedback, Feedback]] | None = None,
    restore_at: int | None = None,
) -> tuple[list[RoundPlan], BudgetScheduler]:
    """Run every round as the server does, in a world the forecast describes exactly:
    ``clients`` uplinks per round, each downlink payload sent to ``clients`` clients in
    the next round, ``extra`` known fixed bytes (e.g. full re-syncs) per round. Spends
    without ``force``, so a plan that overshoots the total raises. ``restore_at``: the
    scheduler goes through a JSON checkpoint before that round (the original is left
    behind; the restored one is returned with the plans)."""
    extra = extra or {}
    rounds = sched.params.num_rounds
    plans: list[RoundPlan] = []
    for r in range(1, rounds + 1):
        if r == restore_at:
            state = json.loads(json.dumps(sched.state_dict()))
            sched = BudgetScheduler.from_state_dict(sched.params, state)
        prev_down = clients * size(plans[-1].n_downlink) if plans else 0
        demands = [
            Demand(clients, clients if j < rounds else 0, (prev_down if j == r else 0) + extra.get(j, 0))
            for j in range(r, rounds + 1)
        ]
        plan = sched.plan_round(r, demands, size)
        sched.spend(DOWN, demands[0].fixed)
        sched.spend(UP, clients * size(plan.n_uplink))
        if feedback is not None:
            up, down = feedback(r)
            sched.observe(UP, up)
            sched.observe(DOWN, down)
            sched.observe_accuracy(0.5)
        plans.append(plan)
    return plans, sched


def cost_at(n: int, rounds: int, clients: int = K) -> int:
    """Bytes of a whole fixed-n run in :func:`federation`'s world."""
    return rounds * clients * size_of(n) + (rounds - 1) * clients * size_of(n)


# --------------------------------------------------------------------------- spending


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n_fixed", [2, 7, 20])
def test_every_policy_spends_95_to_100_percent_of_a_budget_needing_all_rounds(
    policy: str, n_fixed: int
) -> None:
    total = cost_at(n_fixed, 12) + 1234
    sched = make(policy, total, 12)
    plans, _ = federation(sched, feedback=lambda r: (Feedback(0.2, 1.0 + r), Feedback(0.9, 0.1)))
    rep = sched.report()
    assert 0.95 * total <= rep["spent_total"] <= total
    assert len(rep["rounds"]) == 12
    assert all(1 <= p.n_uplink <= 64 and 1 <= p.n_downlink <= 64 for p in plans)
    assert rep["spent_total"] == sum(r["spent_uplink"] + r["spent_downlink"] for r in rep["rounds"])


def test_constant_gives_every_round_the_same_n_and_the_last_downlink_is_free() -> None:
    sched = make("constant", cost_at(5, 10), 10)
    plans, _ = federation(sched)
    assert {p.n_uplink for p in plans} == {5}
    assert {p.n_downlink for p in plans[:-1]} == {5}
    assert plans[-1].n_downlink == 64  # never sent: it only defines the final model
    rows = sched.report()["rounds"]
    assert all(r["planned_uplink"] == r["spent_uplink"] for r in rows)
    assert all(r["planned_downlink"] == r["spent_downlink"] for r in rows)


def test_decay_front_loads_and_still_spends_the_budget() -> None:
    total = cost_at(8, 12)
    sched = make("decay", total, 12, decay=0.8)
    ns = [p.n_uplink for p in federation(sched)[0]]
    assert ns[0] > ns[-2] and ns[0] > 8
    assert all(a >= b for a, b in zip(ns[:-1], ns[1:-1], strict=False)), ns
    assert sched.report()["spent_total"] >= 0.95 * total


def test_n_min_is_kept_per_direction_and_a_round_that_cannot_pay_it_stops_the_run() -> None:
    sched = make("decay", cost_at(4, 10), 10, decay=0.5, n_min_uplink=3, n_min_downlink=2)
    plans, _ = federation(sched)
    assert min(p.n_uplink for p in plans) >= 3 and min(p.n_downlink for p in plans) >= 2
    broke = make("constant", K * size_of(3) - 1, 5, n_min_uplink=3)
    with pytest.raises(BudgetExhausted, match="round 1 needs"):
        federation(broke)


def test_a_budget_too_small_for_every_round_says_once_where_the_run_will_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: 4 of 10 rounds at n_min = 1 (each round's uplinks plus its downlink's deliveries)
    total = 4 * 2 * K * size_of(1)
    demands = [Demand(K, K) for _ in range(10)]
    # Execute
    with caplog.at_level(logging.WARNING, logger="e3sfc_core.budget"):
        short = make("constant", total, 10)
        short.plan_round(1, demands, size_of)
        short.plan_round(2, demands[1:], size_of)
        enough = make("constant", 10 * 2 * K * size_of(1), 10)
        enough.plan_round(1, demands, size_of)
    # Assert: one warning, naming the last round paid for; none when every round fits
    assert rounds_affordable(enough.params, demands, size_of, total) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rounds 1 to 4 of 10" in warnings[0], warnings


def test_a_flat_size_function_gets_the_largest_n_of_equal_size() -> None:
    flat = lambda n: max(1400, size_of(n))  # noqa: E731 - a payload floor, as payload-ratio makes
    assert largest_fitting(lambda n: flat(n) <= 1400, 1, 64) == 4
    sched = make("constant", 10**6, 1)
    plan = sched.plan_round(1, [Demand(K, 0)], lambda n: flat(n) if n < 5 else 10**9)
    assert plan.n_uplink == 4


# ---------------------------------------------------------------------- catch-up plan


def test_known_catch_up_of_a_later_round_is_kept_in_reserve() -> None:
    resync = 150_000  # a full-weights re-sync the server knows round 8 must send
    total = cost_at(6, 10)
    blind, planned = make("constant", total, 10), make("constant", total + resync, 10)
    a, _ = federation(blind)
    b, _ = federation(planned, extra={8: resync})
    assert [p.n_uplink for p in a] == [p.n_uplink for p in b]  # the re-sync is paid on top
    squeezed = make("constant", total, 10)
    c, _ = federation(squeezed, extra={8: resync})  # the same total must now also carry it
    assert c[0].n_uplink < a[0].n_uplink
    assert squeezed.report()["spent_total"] <= total


def test_deliveries_size_the_downlink_payload() -> None:
    sched = make("constant", 10**6, 3)
    few = sched.plan_round(1, [Demand(K, 2), Demand(K, 2), Demand(K, 0)], size_of)
    many = make("constant", 10**6, 3).plan_round(1, [Demand(K, 40), Demand(K, 40), Demand(K, 0)], size_of)
    assert many.n_downlink < few.n_downlink
    assert few.allowance is not None and 2 * size_of(few.n_downlink) <= few.allowance


# ----------------------------------------------------------------------- adaptive


P = BudgetParams("adaptive", 1, 1)


@pytest.mark.parametrize(
    ("now", "before", "change"),
    [
        (Feedback(0.1, 0.5), Feedback(0.5, 0.5), 0.0),  # low cosine
        (Feedback(0.5, 1.3), Feedback(0.5, 1.0), 0.0),  # residual outgrows the update
        (Feedback(0.9, 0.4), Feedback(0.9, 0.5), -0.1),  # accuracy fell
    ],
)
def test_adaptive_raises_its_factor_when_compression_falls_behind(
    now: Feedback, before: Feedback, change: float
) -> None:
    assert next_factor(P, 1.0, now, before, change) == pytest.approx(1.25)
    assert next_factor(P, 2.0, now, before, change) == 2.0  # clamped


def test_adaptive_lowers_its_factor_when_compression_keeps_up_and_otherwise_returns_to_one() -> None:
    assert next_factor(P, 1.0, Feedback(0.9, 0.4), Feedback(0.9, 0.5), 0.01) == pytest.approx(0.8)
    assert next_factor(P, 0.5, Feedback(0.9, 0.4), Feedback(0.9, 0.5), 0.01) == 0.5
    neutral = Feedback(0.5, 1.0)
    assert next_factor(P, 1.6, neutral, neutral, 0.0) == pytest.approx(1.28)
    assert next_factor(P, 1.1, neutral, neutral, 0.0) == 1.0
    assert next_factor(P, 0.7, neutral, neutral, None) == pytest.approx(0.875)
    assert next_factor(P, 1.3, None, neutral, None) == 1.3  # nothing seen: unchanged


def test_adaptive_moves_n_in_the_direction_that_falls_behind_only() -> None:
    demands = [Demand(K, K)] * 9 + [Demand(K, 0)]
    plans, factors = {}, {}
    for policy in ("adaptive", "constant"):
        sched = make(policy, cost_at(6, 10), 10)
        sched.plan_round(1, demands, size_of)
        sched.observe(UP, Feedback(0.5, 1.0))  # neutral: the factors stay at 1
        sched.observe(DOWN, Feedback(0.5, 1.0))
        sched.plan_round(2, demands[1:], size_of)
        sched.observe(UP, Feedback(0.1, 2.0))  # the uplink falls behind, the downlink keeps up
        sched.observe(DOWN, Feedback(0.9, 0.2))
        plans[policy] = sched.plan_round(3, demands[2:], size_of)
        factors[policy] = dict(sched.factors)
    assert factors["adaptive"] == {UP: pytest.approx(1.25), DOWN: pytest.approx(0.8)}
    assert factors["constant"] == {UP: 1.0, DOWN: 1.0}  # feedback kept, not acted upon
    assert plans["adaptive"].n_uplink > plans["constant"].n_uplink
    assert plans["adaptive"].n_downlink < plans["constant"].n_downlink
    # bytes move between the directions, not between rounds
    assert plans["adaptive"].allowance == plans["constant"].allowance


def test_non_finite_feedback_is_ignored() -> None:
    sched = make("adaptive", 1000, 3)
    sched.observe(UP, Feedback(float("nan"), 1.0))
    sched.observe(DOWN, Feedback(0.1, float("inf")))
    sched.observe_accuracy(float("nan"))
    assert sched.pending == {UP: [], DOWN: []} and sched.accuracies == []


# --------------------------------------------------------------------- accounting


def test_spend_past_total_raises_and_force_records(caplog: pytest.LogCaptureFixture) -> None:
    sched = make("constant", 1000, 2)
    sched.plan_round(1, [Demand(1, 1), Demand(1, 0)], size_of)
    sched.spend(DOWN, 600)
    assert sched.can_afford(400) and not sched.can_afford(401)
    with pytest.raises(BudgetExhausted, match="600"):
        sched.spend(UP, 401)
    assert sched.spent() == 600  # refused bytes are not recorded
    with caplog.at_level(logging.WARNING, logger="e3sfc_core.budget"):
        sched.spend(UP, 700, force=True)
    assert any("force" in rec.getMessage() for rec in caplog.records)
    assert sched.spent(UP) == 700 and sched.spent() == 1300 and sched.remaining() == 0
    assert sched.can_afford(0) and not sched.can_afford(1)


def test_plan_is_fixed_within_a_round() -> None:
    sched = make("adaptive", 100_000, 5)
    demands = [Demand(K, K)] * 4 + [Demand(K, 0)]
    plan = sched.plan_round(1, demands, size_of)
    sched.spend(DOWN, 20_000)
    sched.observe(UP, Feedback(0.0, 9.0))
    assert sched.plan_round(1, demands[:1], size_of) == dataclasses.replace(plan, spent_downlink=20_000)


def test_unlimited_uses_n_default_even_below_n_min() -> None:
    sched = make("decay", 0, 5, n_min_uplink=2, n_min_downlink=2, n_default=1)
    plan = sched.plan_round(1, [], size_of)
    assert (plan.n_uplink, plan.n_downlink, plan.allowance) == (1, 1, None)
    assert sched.remaining() is None and sched.can_afford(10**15)


# --------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("policy", POLICIES)
def test_state_json_round_trip_gives_identical_decisions(policy: str) -> None:
    def fb(r: int) -> tuple[Feedback, Feedback]:
        return Feedback(0.1 + 0.07 * r, 0.5 + 0.2 * (r % 3)), Feedback(0.7, 1.0 - 0.05 * r)

    whole = make(policy, cost_at(6, 10), 10, decay=0.8)
    resumed = make(policy, cost_at(6, 10), 10, decay=0.8)
    plans, restored = federation(resumed, feedback=fb, restore_at=6)
    assert plans == federation(whole, feedback=fb)[0]
    assert restored.report() == whole.report() and restored.state_dict() == whole.state_dict()


def test_a_format_1_state_keeps_what_each_round_spent() -> None:
    old = {"format": 1, "rounds": [{"round": 1, "planned": 500.0, "uplink": 300, "downlink": 200}]}
    sched = BudgetScheduler.from_state_dict(BudgetParams("constant", 1000, 3), old)
    assert sched.spent(UP) == 300 and sched.remaining() == 500


def test_from_state_dict_rejects_garbage() -> None:
    sched = make("constant", 1000, 3)
    good = sched.state_dict()
    with pytest.raises(ConfigError, match="format"):
        BudgetScheduler.from_state_dict(sched.params, {**good, "format": 99})
    with pytest.raises(ConfigError, match="malformed"):
        BudgetScheduler.from_state_dict(sched.params, {k: v for k, v in good.items() if k != "plans"})
    with pytest.raises(ConfigError, match="malformed"):
        BudgetScheduler.from_state_dict(sched.params, {**good, "factors": {"sideways": 1.0}})


# ----------------------------------------------------------------------- property


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    policy=st.sampled_from(POLICIES),
    rounds=st.integers(min_value=2, max_value=15),
    clients=st.integers(min_value=1, max_value=10),
    fixed=st.integers(min_value=0, max_value=3_000),
    per_sample=st.integers(min_value=1, max_value=400),
    n_min=st.integers(min_value=1, max_value=4),
    spare=st.floats(min_value=0.0, max_value=1.0),
    resync=st.integers(min_value=0, max_value=50_000),
    cosines=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=16, max_size=16),
)
def test_property_within_total_and_at_least_95_percent_spent(
    policy, rounds, clients, fixed, per_sample, n_min, spare, resync, cosines
) -> None:
    # A budget between the run at n_min and half the run at n_max (so the last rounds
    # can absorb any rounding), with a known re-sync in the middle round
    def size(n: int) -> int:
        return fixed + n * per_sample

    def run_cost(n: int) -> int:
        return (2 * rounds - 1) * clients * size(n) + resync

    low, high = run_cost(n_min), run_cost(64) // 2
    total = int(low + spare * max(0, high - low)) + 1
    sched = make(policy, total, rounds, n_min_uplink=n_min, n_min_downlink=n_min)
    plans, _ = federation(
        sched,
        clients=clients,
        size=size,
        extra={rounds // 2 + 1: resync},
        feedback=lambda r: (Feedback(cosines[r], 1.0 + cosines[-r]), Feedback(cosines[-r], 0.5)),
    )
    spent = sched.spent()
    assert spent <= total  # spend() without force would already have raised
    assert all(n_min <= min(p.n_uplink, p.n_downlink) <= max(p.n_uplink, p.n_downlink) <= 64 for p in plans)
    if high > low:
        assert spent >= 0.95 * total, (spent, total)
