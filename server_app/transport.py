"""The round loop's transport over a Flower Grid (:class:`e3sfc_core.transport.Transport`).

The experiment samples partition ids, not Flower's random node IDs: each round starts by
asking new nodes for their partition (:mod:`server_app.discovery`), and the instructions
and replies are mapped between partitions and nodes here. Replies are pulled every 0.2 s
instead of Flower's 3 s. Nothing about the run is decided here: the core's loop plans,
aggregates and stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from e3sfc_core.protocol import Instruction, Reply
from e3sfc_core.transport import Roll
from e3sfc_flower.records import instruction_content, reply_from

from .discovery import POLL_SECONDS, PartitionDiscovery

logger = logging.getLogger(__name__)


class GridTransport:
    """Carries rounds to the SuperNodes of one Flower run."""

    def __init__(self, grid: Grid, num_partitions: int, min_nodes: int, timeout: float) -> None:
        self.grid = grid
        self.min_nodes = min_nodes
        self.timeout = timeout
        self.discovery = PartitionDiscovery(num_partitions, timeout)

    def _wait_for_nodes(self) -> list[int]:
        """Node IDs once at least ``min_nodes`` are connected (bounded wait)."""
        deadline = time.monotonic() + self.timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.min_nodes or time.monotonic() > deadline:
                return nodes
            time.sleep(POLL_SECONDS)

    def roll(self, server_round: int) -> Roll:
        """Partitions served by connected nodes, after asking new nodes which is theirs."""
        nodes = self._wait_for_nodes()
        admission = self.discovery.refresh(self.grid, nodes)
        absent = (
            f"none of the {len(nodes)} connected SuperNode(s) reported a valid partition"
            if nodes
            else f"no SuperNode connected within {self.timeout:.0f} s"
        )
        return Roll(self.discovery.roster.partitions(), admission.rejoined, absent)

    def exchange(self, server_round: int, plan: Mapping[int, Instruction]) -> list[Reply]:
        """One train message per planned partition, to the node serving it; the replies
        (Flower errors included) keyed by partition again."""
        roster = self.discovery.roster
        logger.info("round %d: partitions %s", server_round, sorted(plan))
        train = MessageType.TRAIN
        messages = [
            Message(instruction_content(instr), dst_node_id=roster.node_of(pid), message_type=train)
            for pid, instr in plan.items()
        ]
        return [roster.keyed_by_partition(reply_from(m)) for m in self._send_and_receive(messages)]

    def _send_and_receive(self, messages: list[Message]) -> list[Message]:
        """Push, then pull every ``POLL_SECONDS`` until all replies are in or the round
        times out."""
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + self.timeout
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(POLL_SECONDS)
        if pending:
            logger.warning("%d client(s) did not answer within %.0f s", len(pending), self.timeout)
        return replies
