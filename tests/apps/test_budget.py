"""A budgeted run through the real strategy and ClientApp: half the nodes sampled, one
node's stored weights corrupted (a real desync), every message's bytes counted."""

from __future__ import annotations

import csv
from pathlib import Path

from flwr.app import Array, Message

from e3sfc_core.experiment import Experiment
from e3sfc_flower.records import STATE_RESIDUAL, content_bytes, instruction_from
from server_app.strategy import E3SFCStrategy

from ..budget_setup import TOTAL, budget_config
from .conftest import FakeGrid


def test_budgeted_flower_run_with_a_desync_counts_every_byte_and_spends_95_to_100_percent(
    tmp_path: Path,
) -> None:
    # Prepare: 6 nodes, half sampled per round, adaptive policy
    cfg = budget_config(tmp_path, **{"budget-policy": "adaptive"})
    wire = {"bytes": 0}
    corrupted: list[int] = []

    def count_reply(node: int, reply: Message) -> Message:
        if not reply.has_error():
            wire["bytes"] += len(content_bytes(reply.content))
        return reply

    grid = FakeGrid(cfg, 6, count_reply)
    real_push = grid.push_messages

    def push(messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == "train":
                wire["bytes"] += len(content_bytes(msg.content))
        trains = [m for m in messages if m.metadata.message_type == "train"]
        if trains and instruction_from(trains[0]).server_round == 3 and not corrupted:
            for msg in trains:  # the first sampled node that holds weights drifts
                state = grid.contexts[msg.metadata.dst_node_id].state.array_records
                if STATE_RESIDUAL in state and "weights" in state[STATE_RESIDUAL]:
                    w = state[STATE_RESIDUAL]["weights"].numpy().copy()
                    w[0] += 1.0
                    state[STATE_RESIDUAL]["weights"] = Array(w)
                    corrupted.append(msg.metadata.dst_node_id)
                    break
        return real_push(messages)

    grid.push_messages = push  # type: ignore[method-assign]
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    # Assert: the desync was detected and re-synced, all rounds ran, and the scheduler
    # counted exactly the bytes of every message (our encoding, its fields included),
    # within the total and at least 95% of it
    with (exp.run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    budget = exp.server.scheduler.report()
    assert len(corrupted) == 1 and len(rows) == 6 and exp.stopped_early == ""
    assert all(r["sampled"] == "3" for r in rows)
    assert int(rows[2]["desynced"]) == 1 and sum(int(r["full_syncs"]) for r in rows) == 1
    metrics_bytes = sum(int(r["uplink_bytes"]) + int(r["downlink_bytes"]) for r in rows)
    assert budget["spent_total"] == wire["bytes"] == metrics_bytes
    assert 0.95 * TOTAL <= budget["spent_total"] <= TOTAL
