"""Sampling is over partitions: the same seed trains the same clients in every Flower run
(whatever node IDs Flower draws) and in the in-process loop; nodes report their partition
in a QUERY, misconfigured ones are rejected, late and restarted ones are picked up."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from e3sfc_core.config import ExperimentConfig
from e3sfc_core.experiment import Experiment
from e3sfc_core.protocol import Instruction, Reply
from e3sfc_core.simulate import run_reference
from e3sfc_flower.records import RECORD_PARTITION, instruction_from
from server_app.strategy import E3SFCStrategy

from .conftest import FakeGrid

TIMING = {"compress_seconds", "train_seconds", "aggregate_seconds"}
# Two draws of node IDs (node i serves partition i) whose sorted orders differ.
NODE_IDS_A = [42, 9_001_234_567, 5, 77_777]
NODE_IDS_B = [3, 888, 1_000_000_007, 2**40]


def _cfg(tmp_path: Path, name: str, **over: object) -> ExperimentConfig:
    raw = {
        "num-rounds": 3,
        "local-epochs": 1,
        "num-partitions": 4,
        "fraction-train": 0.5,
        "device": "cpu",
        "output-dir": str(tmp_path / "out"),
        "run-name": name,
    }
    raw.update(over)
    return ExperimentConfig.from_run_config(raw)


def _rows(exp: Experiment) -> list[dict[str, str]]:
    with (exp.run_dir / "metrics.csv").open() as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def _trained(grid: FakeGrid) -> list[list[int]]:
    """Partitions that got a train message, per round."""
    rounds: dict[int, list[int]] = {}
    for msg in grid.sent:
        server_round = instruction_from(msg).server_round
        rounds.setdefault(server_round, []).append(grid.partition_of[msg.metadata.dst_node_id])
    return [sorted(rounds[r]) for r in sorted(rounds)]


def _flower_run(tmp_path: Path, name: str, node_ids: list[int]) -> tuple[Experiment, FakeGrid]:
    cfg = _cfg(tmp_path, name)
    grid = FakeGrid(cfg, 4, node_ids=node_ids)
    exp = Experiment(cfg, base_dir=tmp_path)
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    exp.finalize()
    return exp, grid


def test_same_seed_trains_same_partitions_in_every_flower_run_and_in_process(tmp_path: Path) -> None:
    # Prepare: the in-process loop records which partitions it trains
    ref_trained: dict[int, list[int]] = {}

    def hook(server_round: int, instruction: Instruction, reply: Reply) -> Reply:
        ref_trained.setdefault(server_round, []).append(reply.partition_id)
        return reply

    # Execute: two Flower runs with different node IDs, and the in-process loop
    exp_a, grid_a = _flower_run(tmp_path, "a", NODE_IDS_A)
    exp_b, grid_b = _flower_run(tmp_path, "b", NODE_IDS_B)
    ref, _ = run_reference(_cfg(tmp_path, "ref"), base_dir=tmp_path, reply_hook=hook)
    # Assert: the same half of the partitions every round, the same metrics (timing aside)
    trained = _trained(grid_a)
    assert trained == _trained(grid_b) == [sorted(ref_trained[r]) for r in sorted(ref_trained)]
    assert len(trained) == 3 and all(len(t) == 2 for t in trained)
    assert len({tuple(t) for t in trained}) > 1  # sampling really varies by round
    assert _rows(exp_a) == _rows(exp_b) == _rows(ref)
    # every node was asked once, in round 1 only
    assert sorted(m.metadata.dst_node_id for m in grid_a.queries) == sorted(NODE_IDS_A)
    # sampling node IDs (the old rule) would have trained other partitions in these runs
    old = [
        [sorted(NODE_IDS.index(n) for n in exp.server.sample(r, NODE_IDS)) for r in (1, 2, 3)]
        for exp, NODE_IDS in ((exp_a, NODE_IDS_A), (exp_b, NODE_IDS_B))
    ]
    assert old[0] != old[1]


def test_misconfigured_or_silent_nodes_are_left_out_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: partitions 0-3 on nodes 1000-1003, plus a node that claims partition 1 too,
    # one with a partition out of range, one with another num-partitions, one that never
    # answers the query and one that answers garbage
    cfg = _cfg(tmp_path, "bad", **{"num-rounds": 2, "fraction-train": 1.0, "round-timeout": 1.0})
    grid = FakeGrid(cfg, 4)
    grid.add_node(2000, 1)
    grid.add_node(2001, 7)
    grid.add_node(2002, 2, **{"num-partitions": 5})
    grid.add_node(2003, 3)
    grid.add_node(2004, 3)

    def query_tamper(node: int, reply: Message) -> Message | None:
        if node == 2003:
            return None
        if node == 2004:
            content = RecordDict({RECORD_PARTITION: ConfigRecord({"partition-id": "3"})})
            bad = Message(content, reply_to=grid.queries[-1])
            bad.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
            return bad
        return reply

    grid.query_tamper = query_tamper  # type: ignore[assignment]
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    with caplog.at_level(logging.WARNING):
        E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    # Assert: partitions 0, 2 and 3 trained on their own nodes; partition 1 (claimed twice)
    # by nobody; every rejected node is named with its reason, the silent one too
    assert _trained(grid) == [[0, 2, 3], [0, 2, 3]]
    assert {m.metadata.dst_node_id for m in grid.sent} == {1000, 1002, 1003}
    text = caplog.text
    assert "node 1001 rejected: partition 1 is reported by nodes [1001, 2000]" in text
    assert "node 2000 rejected" in text
    assert "node 2001 rejected: partition-id 7 is outside [0, 4)" in text
    assert "node 2002 rejected: it reports num-partitions=5, the run has 4" in text
    assert "node 2004 rejected: bad answer" in text
    assert "[2003] did not report a partition" in text
    rows = _rows(exp)
    assert all(r["accepted"] == "3" and r["dropped"] == "0" for r in rows)


def test_late_and_restarted_nodes_are_asked_and_trained(tmp_path: Path) -> None:
    # Prepare: round 1 has partitions 0-2; after it, node 5000 joins with partition 3 and
    # the node of partition 0 restarts as node 5001 with empty state (no state-dir)
    cfg = _cfg(tmp_path, "late", **{"fraction-train": 1.0})
    grid = FakeGrid(cfg, 4, node_ids=[1000, 1001, 1002])

    def tamper(node: int, reply: Message) -> Message:
        if len(grid.sent) == 3:  # the last reply of round 1
            grid.add_node(5000, 3)
            grid.remove_node(1000)
            grid.add_node(5001, 0)
        return reply

    grid.tamper = tamper
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    # Assert: both new nodes were asked and trained from round 2; the restarted one got
    # the full weights (its state is gone) instead of failing a replay, the new one
    # replayed round 1's downlink; nobody desynced
    assert _trained(grid) == [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert [m.metadata.dst_node_id for m in grid.queries] == [1000, 1001, 1002, 5000, 5001]
    rows = _rows(exp)
    assert [r["full_syncs"] for r in rows] == ["0", "1", "0"]
    assert all(r["desynced"] == "0" and r["dropped"] == "0" for r in rows)


def test_run_stops_with_a_reason_when_no_node_reports_a_valid_partition(tmp_path: Path) -> None:
    # Prepare: the run expects 10 partitions, the nodes were configured for 3
    cfg = _cfg(tmp_path, "mismatch", **{"num-partitions": 10})
    grid = FakeGrid(cfg, 3)
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    # Assert: nobody trained, and the summary says why
    assert grid.sent == [] and len(grid.queries) == 3
    assert exp.stopped_early == "none of the 3 connected SuperNode(s) reported a valid partition"
