"""Budgeted runs end to end, in process: half the clients sampled, a desync injected,
every byte that travels counted, the total never exceeded and nearly all of it spent."""

from __future__ import annotations

from pathlib import Path

import pytest

from e3sfc_core.experiment import Experiment
from e3sfc_core.protocol import STATUS_DESYNC, Instruction, Reply
from e3sfc_core.simulate import run_reference

from ..budget_setup import TOTAL, budget_config


class Wire:
    """Reply hook that counts every message the server sent and received (``len()`` of
    its encoding), and turns the first reply of round 2 into a ``desync`` (as a client
    whose weights drifted answers)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.desynced: list[int] = []

    def __call__(self, server_round: int, instruction: Instruction, reply: Reply) -> Reply:
        self.bytes += len(instruction.encode())
        if server_round == 2 and not self.desynced:
            self.desynced.append(reply.node_id)
            reply = Reply(reply.node_id, STATUS_DESYNC, error="drifted", partition_id=reply.partition_id)
        self.bytes += len(reply.encode())
        return reply


@pytest.mark.parametrize("policy", ["constant", "decay", "adaptive"])
def test_budgeted_run_with_sampling_and_a_desync_spends_95_to_100_percent(
    tmp_path: Path, policy: str
) -> None:
    # Prepare
    cfg = budget_config(tmp_path, **{"budget-policy": policy})
    wire = Wire()
    # Execute
    exp, summary = run_reference(cfg, base_dir=tmp_path, reply_hook=wire)
    # Assert: every round ran, the desync cost a full re-sync, and the scheduler's count is
    # exactly the bytes that travelled, within the total and at least 95% of it
    recs = exp.server.records
    budget = summary["budget"]
    assert summary["stopped_early"] == "" and len(recs) == 6
    assert all(r.sampled == 3 for r in recs)
    assert recs[1].desynced == 1 and sum(r.full_syncs for r in recs) == 1
    assert budget["spent_total"] == wire.bytes == sum(r.uplink_bytes + r.downlink_bytes for r in recs)
    assert 0.95 * TOTAL <= budget["spent_total"] <= TOTAL
    rows = budget["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["spent_uplink"] <= r["planned_uplink"] for r in rows)
    assert all(r["spent_downlink"] == r["planned_downlink"] for r in rows)
    assert all(2 <= r["n_uplink"] <= 12 and 2 <= r["n_downlink"] <= 12 for r in rows)


def test_a_budget_that_cannot_carry_the_resync_stops_the_run_before_overspending(tmp_path: Path) -> None:
    # Prepare: the re-sync alone is more than what is left after two rounds
    cfg = budget_config(tmp_path, **{"budget-total-bytes": 200_000})
    wire = Wire()
    # Execute
    exp, summary = run_reference(cfg, base_dir=tmp_path, reply_hook=wire)
    # Assert
    assert "needs" in summary["stopped_early"] and len(exp.server.records) < 6
    assert summary["budget"]["spent_total"] == wire.bytes <= 200_000


def test_forecast_bounds_what_a_fixed_n_run_sends(tmp_path: Path) -> None:
    # Prepare: a fixed n = 3 run (no budget), both ways compressed, half sampled
    cfg = budget_config(
        tmp_path,
        **{"budget-total-bytes": 0, "synthetic-samples": 3, "downlink": "compressed", "num-rounds": 5},
    )
    server = Experiment(cfg, base_dir=tmp_path).server
    first = {c: server.downlink_for(c) for c in server.sample(1, range(cfg.num_partitions))}
    demands = server.forecast(1, first)
    # Execute
    replays = []

    def count(server_round: int, instruction: Instruction, reply: Reply) -> Reply:
        replays.append(len(instruction.downlink))
        return reply

    exp, _ = run_reference(cfg, base_dir=tmp_path, reply_hook=count)
    # Assert: the forecast knew every round's clients and every catch-up payload, and its
    # payload sizes are bounds: never below what was sent, and close to it
    recs = exp.server.records
    assert [d.uplinks for d in demands] == [r.sampled for r in recs]
    sent = sum(r.uplink_bytes + r.downlink_bytes for r in recs)
    foreseen = sum(d.cost(server.payload_size, 3, 3) for d in demands)
    assert sent <= foreseen <= 1.03 * sent
    assert sum(d.deliveries for d in demands) == sum(replays) > 0


def test_killed_budgeted_run_resumes_with_the_same_plans(tmp_path: Path) -> None:
    # Prepare: an adaptive budgeted run straight through, and the same run stopped after
    # round 3 (as a crash would) and resumed from its checkpoint and client states
    over = {"budget-policy": "adaptive", "budget-total-bytes": 80_000, "checkpoint-every": 1}
    straight, straight_summary = run_reference(
        budget_config(tmp_path, **over, **{"run-name": "straight"}), base_dir=tmp_path
    )
    cfg = budget_config(tmp_path, **over, **{"run-name": "resumed"})
    states = tmp_path / "client-states"
    run_reference(cfg, base_dir=tmp_path, stop_after=3, state_dir=states)
    # Execute
    resumed, summary = run_reference(
        cfg.model_copy(update={"resume": True}), base_dir=tmp_path, state_dir=states
    )
    # Assert: the scheduler's state came back with the checkpoint: same plans, same bytes
    assert resumed.start_round == 4
    assert summary["budget"] == straight_summary["budget"]
    assert [r.accuracy for r in resumed.server.records] == [r.accuracy for r in straight.server.records]
