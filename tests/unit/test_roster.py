"""The partition <-> node roster: what it admits, what it rejects and why, rejoins."""

from __future__ import annotations

import logging

import pytest

from e3sfc_core.errors import PayloadError
from e3sfc_core.protocol import STATUS_ERROR, STATUS_OK, PartitionAnswer, Reply
from e3sfc_core.roster import Roster


def _answers(**by_node: int) -> dict[int, PartitionAnswer]:
    return {int(node[1:]): PartitionAnswer(pid, 4) for node, pid in by_node.items()}


def test_valid_answers_map_partitions_both_ways() -> None:
    # Prepare
    roster = Roster(4)
    # Execute
    admission = roster.admit(_answers(n907=2, n13=0, n500=3))
    # Assert
    assert admission.admitted == {13: 0, 500: 3, 907: 2} and not admission.rejected
    assert roster.partitions() == [0, 2, 3]
    assert (roster.node_of(2), roster.partition_of(907), roster.partition_of(1)) == (907, 2, None)
    assert roster.unknown([13, 907, 500, 1]) == [1]
    with pytest.raises(KeyError, match="partition 1"):
        roster.node_of(1)


def test_bad_and_duplicate_partitions_are_rejected_naming_the_node(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    roster = Roster(4)
    roster.admit(_answers(n1=0))
    answers = {
        2: PartitionAnswer(0, 4),  # partition 0 is served by node 1
        3: PartitionAnswer(1, 4),  # 3 and 4 claim partition 1 at once
        4: PartitionAnswer(1, 4),
        5: PartitionAnswer(4, 4),  # out of range
        6: PartitionAnswer(-1, 4),
        7: PartitionAnswer(2, 5),  # another split of the data
        8: PartitionAnswer(3, 4),
    }
    # Execute
    with caplog.at_level(logging.ERROR, logger="e3sfc_core.roster"):
        admission = roster.admit(answers)
    # Assert
    assert admission.admitted == {8: 3}
    assert sorted(admission.rejected) == [2, 3, 4, 5, 6, 7]
    assert "served by node 1" in admission.rejected[2]
    assert "nodes [3, 4]" in admission.rejected[3] == admission.rejected[4]
    assert "outside [0, 4)" in admission.rejected[5] and "outside" in admission.rejected[6]
    assert "num-partitions=5" in admission.rejected[7]
    for node in (2, 3, 4, 5, 6, 7):
        assert f"node {node} rejected" in caplog.text
    assert roster.partitions() == [0, 3]
    assert roster.unknown([1, 2, 3, 8]) == [2, 3]  # rejected nodes are asked again later


def test_a_restarted_node_takes_over_its_partition_once_the_old_one_left() -> None:
    # Prepare: node 10 serves partition 2, then is restarted as node 11
    roster = Roster(4)
    roster.admit(_answers(n10=2, n20=1))
    # Execute / Assert: while 10 is still connected, 11 is a duplicate
    assert 11 in roster.admit(_answers(n11=2)).rejected
    assert roster.retain([11, 20]) == [2]
    admission = roster.admit(_answers(n11=2))
    assert admission.admitted == {11: 2} and admission.rejoined == [2]
    assert roster.node_of(2) == 11
    # a partition served for the first time is not a rejoin
    assert roster.admit(_answers(n30=0)).rejoined == []


def test_replies_are_keyed_by_partition_and_checked_against_it() -> None:
    # Prepare
    roster = Roster(4)
    roster.admit(_answers(n77=3))
    # Execute
    good = roster.keyed_by_partition(Reply(77, STATUS_OK, b"x", 5, partition_id=3))
    liar = roster.keyed_by_partition(Reply(77, STATUS_OK, b"x", 5, partition_id=1))
    crashed = roster.keyed_by_partition(Reply(77, STATUS_ERROR, error="client error: boom"))
    stranger = roster.keyed_by_partition(Reply(78, STATUS_OK, b"x", 5, partition_id=0))
    # Assert
    assert (good.node_id, good.status) == (3, STATUS_OK)
    assert (liar.node_id, liar.status) == (3, STATUS_ERROR) and "partition 1" in liar.error
    assert (crashed.node_id, crashed.error) == (3, "client error: boom")
    assert (stranger.node_id, stranger.status) == (-1, STATUS_ERROR) and "node 78" in stranger.error


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"partition-id": 1},
        {"partition-id": "1", "num-partitions": 4},
        {"partition-id": True, "num-partitions": 4},
    ],
)
def test_partition_answer_fields_must_be_integers(fields: dict[str, object]) -> None:
    with pytest.raises(PayloadError, match="partition answer field"):
        PartitionAnswer.from_fields(fields)


def test_partition_answer_round_trips() -> None:
    assert PartitionAnswer.from_fields(PartitionAnswer(2, 7).fields()) == PartitionAnswer(2, 7)
