"""Budget scheduler: bounds, policies, hard total, accounting and checkpoint round trip."""

from __future__ import annotations

import itertools
import json
import logging
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e3sfc_core.budget import POLICIES, BudgetFeedback, BudgetParams, BudgetScheduler
from e3sfc_core.errors import BudgetExhausted, ConfigError
from e3sfc_core.payload import Direction

PC = 10


def make(*args: Any, **kwargs: Any) -> BudgetScheduler:
    """A fresh scheduler with these :class:`BudgetParams`."""
    return BudgetScheduler(BudgetParams(*args, **kwargs))


def size_of(n: int) -> int:
    return 40 + 300 * n


def run_round(sched: BudgetScheduler, r: int, payload_count: int = PC, size=size_of) -> int:
    """One round as the server does it: plan, choose n, send down and up if affordable."""
    sched.plan_round(r)
    n = sched.choose_samples(r, payload_count=payload_count, size_of=size)
    cost = payload_count * size(n)
    for direction in ("downlink", "uplink"):
        if sched.can_afford(cost):
            sched.spend(direction, cost)
    return n


def simulate(sched: BudgetScheduler, rounds: int, feedback: BudgetFeedback | None = None):
    ns = []
    for r in range(1, rounds + 1):
        ns.append(run_round(sched, r))
        if feedback is not None:
            sched.observe("uplink", feedback)
    return ns


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("total", [1, 5_000, 338_000, 10**9])
def test_choice_always_within_bounds(policy: str, total: int) -> None:
    sched = make(policy, total, 10, n_min=2, n_max=20)
    ns = simulate(sched, 12, BudgetFeedback(0.1, 0.99))
    assert all(2 <= n <= 20 for n in ns)
    if total == 1:
        assert set(ns) == {2}  # nothing fits: n_min, refusal is can_afford's job
        assert sched.report()["spent_total"] == 0
    if total == 10**9:
        assert ns[0] == 20


def test_choice_is_largest_fitting_and_respects_share_and_reserved() -> None:
    sched = make("constant", 100_000, 1, n_max=1000)
    allowance = sched.round_allowance(1)
    assert allowance == 100_000
    n = sched.choose_samples(1, payload_count=PC, size_of=size_of)
    assert PC * size_of(n) <= 0.5 * allowance < PC * size_of(n + 1)
    n_full = sched.choose_samples(1, payload_count=PC, size_of=size_of, share=1.0)
    assert PC * size_of(n_full) <= allowance < PC * size_of(n_full + 1)
    n_res = sched.choose_samples(1, payload_count=PC, size_of=size_of, reserved=20_000)
    assert 20_000 + PC * size_of(n_res) <= 0.5 * allowance < 20_000 + PC * size_of(n_res + 1)
    assert n_res < n < n_full


# --------------------------------------------------------------------------- policies


def test_constant_spends_evenly_and_uses_most_of_budget() -> None:
    total, rounds = 338_000, 10
    sched = make("constant", total, rounds, n_max=64)
    ns = simulate(sched, rounds)
    rep = sched.report()
    assert rep["spent_total"] <= total
    assert rep["spent_total"] > 0.8 * total
    assert max(ns) - min(ns) <= 1
    spent = [row["spent"] for row in rep["rounds"]]
    assert len(spent) == rounds and min(spent) > 0
    assert max(spent) <= 1.25 * min(spent)


def test_decay_is_non_increasing_and_front_loaded() -> None:
    total, rounds = 500_000, 12
    sched = make("decay", total, rounds, decay=0.85)
    ns = simulate(sched, rounds)
    assert all(a >= b for a, b in itertools.pairwise(ns)), ns
    assert ns[0] > ns[-1]
    rep = sched.report()
    planned = [row["planned"] for row in rep["rounds"]]
    assert all(a >= b for a, b in itertools.pairwise(planned)), planned
    assert rep["spent_total"] <= total
    # the first round gets w_1 / sum(w) of the total
    weights = [0.85**k for k in range(rounds)]
    assert math.isclose(planned[0], total / sum(weights), rel_tol=1e-9, abs_tol=1)


def test_decay_one_starts_like_constant_but_never_rises() -> None:
    a = make("decay", 338_000, 10, decay=1.0)
    b = make("constant", 338_000, 10)
    assert a.round_allowance(1) == b.round_allowance(1)
    ns_decay, ns_constant = simulate(a, 10), simulate(b, 10)
    assert len(set(ns_decay)) == 1  # rounding slack is not piled onto late rounds
    assert ns_decay[0] == ns_constant[0] and max(ns_constant) > ns_constant[0]


def _after_round_one(policy: str) -> BudgetScheduler:
    sched = make(policy, 1_000_000, 10, n_max=200)
    run_round(sched, 1)
    return sched


@pytest.mark.parametrize(
    "feedback",
    [BudgetFeedback(0.1, 0.5), BudgetFeedback(0.5, 0.99)],  # low cosine / high residual
)
def test_adaptive_raises_n_after_poor_feedback(feedback: BudgetFeedback) -> None:
    adaptive, constant = _after_round_one("adaptive"), _after_round_one("constant")
    assert adaptive.report()["spent_total"] == constant.report()["spent_total"]
    for s in (adaptive, constant):
        s.observe("uplink", feedback)
        s.plan_round(2)
    kw = {"payload_count": PC, "size_of": size_of}
    assert adaptive.choose_samples(2, **kw) > constant.choose_samples(2, **kw)
    assert adaptive.factor == pytest.approx(1.25)
    assert constant.factor == 1.0
    assert constant.last_feedback[Direction.UPLINK] == feedback  # kept, but not acted upon


def test_adaptive_lowers_n_after_good_feedback() -> None:
    adaptive, constant = _after_round_one("adaptive"), _after_round_one("constant")
    for s in (adaptive, constant):
        s.observe("uplink", BudgetFeedback(0.9, 0.3))
        s.observe("downlink", BudgetFeedback(0.8, 0.4))
    kw = {"payload_count": PC, "size_of": size_of}
    assert adaptive.choose_samples(2, **kw) < constant.choose_samples(2, **kw)
    adaptive.plan_round(2)
    assert adaptive.factor == pytest.approx(0.8)  # one step per round, not per observation


def test_adaptive_neutral_feedback_keeps_constant_and_factor_is_clamped() -> None:
    adaptive, constant = _after_round_one("adaptive"), _after_round_one("constant")
    adaptive.observe("uplink", BudgetFeedback(0.45, 0.8))
    assert adaptive.round_allowance(2) == constant.round_allowance(2)
    up = make("adaptive", 10**12, 100)
    down = make("adaptive", 10**12, 100)
    for r in range(1, 30):
        up.plan_round(r)
        down.plan_round(r)
        up.observe("uplink", BudgetFeedback(0.0, 1.0))
        down.observe("uplink", BudgetFeedback(1.0, 0.0))
    up.plan_round(30)
    down.plan_round(30)
    assert up.factor == 4.0
    assert down.factor == 0.25


def test_non_finite_feedback_is_ignored() -> None:
    sched = _after_round_one("adaptive")
    before = sched.state_dict()
    sched.observe("uplink", BudgetFeedback(float("nan"), 1.0))
    sched.observe("uplink", BudgetFeedback(0.1, float("inf")))
    assert sched.state_dict() == before


# --------------------------------------------------------------------------- accounting


def test_spend_past_total_raises_and_force_records(caplog: pytest.LogCaptureFixture) -> None:
    sched = make("constant", 1000, 2)
    sched.plan_round(1)
    sched.spend("downlink", 600)
    assert sched.can_afford(400) and not sched.can_afford(401)
    with pytest.raises(BudgetExhausted) as exc:
        sched.spend("uplink", 401)
    msg = str(exc.value)
    assert "600" in msg and "401" in msg and "1000" in msg
    assert sched.report()["spent_total"] == 600  # refused bytes are not recorded
    with caplog.at_level(logging.WARNING, logger="e3sfc_core.budget"):
        sched.spend("uplink", 700, force=True)
    assert any("force" in rec.getMessage() for rec in caplog.records)
    rep = sched.report()
    assert rep["spent_uplink"] == 700 and rep["spent_downlink"] == 600
    assert rep["spent_total"] == 1300 and rep["remaining"] == 0 and rep["overspent"] == 300
    assert rep["rounds"] == [
        {"round": 1, "planned": 500, "spent": 1300, "spent_uplink": 700, "spent_downlink": 600}
    ]
    assert not sched.can_afford(1)
    assert sched.can_afford(0)


def test_spend_attribution_and_validation() -> None:
    sched = make("constant", 10_000, 4)
    sched.spend("downlink", 100)  # before any round: round 0, unplanned
    sched.spend("uplink", 50, server_round=2)  # plans round 2 on the fly
    sched.spend("downlink", 25)  # latest planned round
    rows = {row["round"]: row for row in sched.report()["rounds"]}
    assert rows[0] == {
        "round": 0,
        "planned": None,
        "spent": 100,
        "spent_uplink": 0,
        "spent_downlink": 100,
    }
    assert rows[2]["spent"] == 75 and rows[2]["planned"] == int((10_000 - 100) / 3)
    with pytest.raises(ValueError, match="direction"):
        sched.spend("sideways", 1)
    with pytest.raises(ValueError, match="nbytes"):
        sched.spend("uplink", -1)
    with pytest.raises(ValueError, match="server_round"):
        sched.round_allowance(0)


def test_plan_is_fixed_within_round_and_queries_are_pure() -> None:
    sched = make("adaptive", 100_000, 5)
    sched.observe("uplink", BudgetFeedback(0.1, 0.9))
    before = sched.state_dict()
    a = sched.round_allowance(1)
    sched.choose_samples(1, payload_count=PC, size_of=size_of)
    assert sched.state_dict() == before
    assert sched.plan_round(1) == a
    sched.spend("downlink", 20_000)
    assert sched.round_allowance(1) == a  # spending does not move this round's plan
    assert sched.plan_round(1) == a


def test_unlimited_uses_n_default() -> None:
    sched = make("decay", 0, 5, n_min=2, n_max=8, n_default=4)
    assert sched.round_allowance(1) is None
    assert sched.plan_round(1) is None
    assert sched.choose_samples(1, payload_count=PC, size_of=size_of) == 4
    assert sched.remaining() is None and sched.can_afford(10**15)
    sched.spend("uplink", 10**12)
    assert sched.report()["spent_total"] == 10**12
    low = make("constant", 0, 5, n_min=2, n_max=8, n_default=1)
    high = make("constant", 0, 5, n_min=2, n_max=8, n_default=50)
    assert low.choose_samples(1, payload_count=PC, size_of=size_of) == 2
    assert high.choose_samples(1, payload_count=PC, size_of=size_of) == 8


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"policy": "greedy"}, "policy"),
        ({"total_bytes": -1}, "total_bytes"),
        ({"total_bytes": 1.5}, "total_bytes"),
        ({"num_rounds": 0}, "num_rounds"),
        ({"n_min": 0}, "n_min"),
        ({"n_min": 5, "n_max": 4}, "n_max"),
        ({"n_max": 70_000}, "n_max"),
        ({"n_default": 0}, "n_default"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 1.1}, "decay"),
        ({"cos_low": 0.7, "cos_high": 0.6}, "cos_high"),
        ({"adaptive_up": 0.9}, "adaptive_up"),
        ({"adaptive_down": 1.5}, "adaptive_down"),
        ({"residual_high": float("nan")}, "residual_high"),
    ],
)
def test_config_validation(kwargs: dict, name: str) -> None:
    args = {"policy": "constant", "total_bytes": 1000, "num_rounds": 3, **kwargs}
    with pytest.raises(ConfigError, match=name) as exc:
        make(**args)
    if name == "policy":
        for allowed in POLICIES:
            assert allowed in str(exc.value)


# --------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_state_dict_json_round_trip_gives_identical_decisions(policy: str) -> None:
    rounds = 10
    feedback = [BudgetFeedback(0.1 + 0.09 * r, 1.0 - 0.05 * r) for r in range(rounds + 1)]
    sched = make(policy, 400_000, rounds, n_max=40, decay=0.8)
    for r in range(1, 5):
        run_round(sched, r)
        sched.observe("uplink", feedback[r])
    sched.observe("downlink", feedback[0])  # pending feedback must survive too
    restored = BudgetScheduler.from_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert restored == sched
    assert restored.report() == sched.report()
    for r in range(5, rounds + 1):
        assert run_round(restored, r) == run_round(sched, r)
        restored.observe("uplink", feedback[r])
        sched.observe("uplink", feedback[r])
    assert restored.report() == sched.report()
    assert restored.state_dict() == sched.state_dict()


def test_from_state_dict_rejects_garbage() -> None:
    good = make("constant", 1000, 3).state_dict()
    with pytest.raises(ConfigError, match="format"):
        BudgetScheduler.from_state_dict({**good, "format": 99})
    with pytest.raises(ConfigError, match="malformed"):
        BudgetScheduler.from_state_dict({k: v for k, v in good.items() if k != "rounds"})
    with pytest.raises(ConfigError, match="policy"):
        BudgetScheduler.from_state_dict({**good, "config": {**good["config"], "policy": "x"}})


# --------------------------------------------------------------------------- property


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    total=st.integers(min_value=1, max_value=3_000_000),
    rounds=st.integers(min_value=1, max_value=15),
    fixed=st.integers(min_value=0, max_value=3_000),
    per_sample=st.integers(min_value=1, max_value=5_000),
    n_min=st.integers(min_value=1, max_value=4),
    n_span=st.integers(min_value=0, max_value=60),
    counts=st.lists(st.integers(min_value=0, max_value=25), min_size=20, max_size=20),
    cosines=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=20, max_size=20),
)
def test_property_hard_total_never_exceeded(
    policy, total, rounds, fixed, per_sample, n_min, n_span, counts, cosines
) -> None:
    sched = make(policy, total, rounds, n_min=n_min, n_max=n_min + n_span)

    def size(n: int) -> int:
        return fixed + n * per_sample

    for r in range(1, rounds + 3):  # two extra rounds: an extended run
        allowance = sched.plan_round(r)
        assert allowance is not None and 0 <= allowance <= total
        down_count, up_count = counts[(2 * r) % 20], counts[(2 * r + 1) % 20]
        n_down = sched.choose_samples(r, payload_count=down_count, size_of=size)
        n_up = sched.choose_samples(r, payload_count=up_count, size_of=size)
        assert sched.params.n_min <= min(n_down, n_up) <= max(n_down, n_up) <= sched.params.n_max
        down, up = down_count * size(n_down), up_count * size(n_up)
        # the plan is self-consistent: a choice that fits its share is always affordable
        if down <= 0.5 * allowance:
            assert sched.can_afford(down)
        if sched.can_afford(down):
            sched.spend("downlink", down)
        if down <= 0.5 * allowance and up <= 0.5 * allowance:
            assert sched.can_afford(up)
        if sched.can_afford(up):
            sched.spend("uplink", up)
        sched.observe("uplink", BudgetFeedback(cosines[r % 20], 1.0 - cosines[r % 20]))
        rep = sched.report()
        assert rep["spent_total"] <= total
        assert rep["remaining"] == total - rep["spent_total"]
        assert sum(row["spent"] for row in rep["rounds"]) == rep["spent_total"]


def _rounds_completed(reserve: bool) -> int:
    """Adaptive policy fed low cosines (so it keeps buying samples): how many of 20
    rounds can be paid for, with or without a per-round floor kept in reserve."""
    size_of = lambda n: 40 + 300 * n  # noqa: E731
    sched = make(policy="adaptive", total_bytes=200_000, num_rounds=20, n_max=16)
    floor = 2 * 10 * size_of(1)
    if reserve:
        sched.reserve_round_floor(floor)
    for r in range(1, 21):
        sched.plan_round(r)
        n = sched.choose_samples(r, payload_count=20, size_of=size_of, share=1.0)
        cost = 20 * size_of(n)
        if not sched.can_afford(cost):
            return r - 1
        sched.spend("uplink", cost, server_round=r)
        sched.observe("uplink", BudgetFeedback(cosine=0.1, residual_ratio=0.99))
    return 20


def test_round_floor_reserve_keeps_every_round_affordable() -> None:
    # Without the reserve the eager policy starves the last rounds; with it, all 20 run
    assert _rounds_completed(reserve=False) < 20
    assert _rounds_completed(reserve=True) == 20
