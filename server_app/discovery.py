"""Ask connected nodes which partition they train on (a Flower QUERY, once per node).

The server samples partitions (``e3sfc_core.roster`` says why), so before a round it needs
the partition of every connected node. Nodes seen before are not asked again; new or
restarted ones are asked at the start of the next round. The query and its answer carry
only the partition id and count: control data like Flower's own message envelope, not
part of the algorithm's traffic, so they are not in the byte counts (which count the
round's instructions and replies only, the same in Flower and in the in-process loop,
which has no such message).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from e3sfc_core.errors import PayloadError
from e3sfc_core.protocol import PartitionAnswer
from e3sfc_core.roster import Admission, Roster
from e3sfc_flower.records import partition_from, query_content

logger = logging.getLogger(__name__)
POLL_SECONDS = 0.2  # how often the server pulls replies (Flower's own default is 3 s)
LATE_WAIT_SECONDS = 10.0  # how long a round waits for nodes that joined after the first


class PartitionDiscovery:
    """Keeps a :class:`Roster` of the connected nodes up to date."""

    def __init__(self, num_partitions: int, timeout: float) -> None:
        self.roster = Roster(num_partitions)
        self.timeout = timeout
        self._asked: dict[str, int] = {}  # query message id -> node, not answered yet

    def refresh(self, grid: Grid, connected: Sequence[int]) -> Admission:
        """Forget nodes that left, ask new ones, admit the answers that arrived.

        Before any partition is known (round 1) it waits up to ``timeout`` for every
        answer, so all nodes connected at the start are sampled from; later it waits at
        most ``LATE_WAIT_SECONDS`` and picks up slower answers in a later round.
        """
        self.roster.retain(connected)
        alive = set(connected)
        self._asked = {m: n for m, n in self._asked.items() if n in alive}
        fresh = self._ask(grid, [n for n in self.roster.unknown(connected) if n not in self._asked.values()])
        wait = self.timeout if not self.roster.partitions() else min(self.timeout, LATE_WAIT_SECONDS)
        deadline = time.monotonic() + wait
        answers: dict[int, PartitionAnswer] = {}
        while self._asked:
            for msg in grid.pull_messages(list(self._asked)):
                mid = msg.metadata.reply_to_message_id
                node = self._asked.pop(mid, None)
                fresh.discard(mid)
                if node is None:
                    continue
                try:
                    answers[node] = partition_from(msg)
                except PayloadError as exc:
                    logger.error("node %s rejected: bad answer to the partition query: %s", node, exc)
            if not fresh or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        if fresh:
            late = sorted(self._asked[m] for m in fresh)
            logger.warning("node(s) %s did not report a partition within %.0f s: left out", late, wait)
        return self.roster.admit(answers)

    def _ask(self, grid: Grid, nodes: list[int]) -> set[str]:
        """Push one partition query per node; returns the pushed message ids."""
        if not nodes:
            return set()
        queries = [Message(query_content(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        ids: list[str | None] = list(grid.push_messages(queries))
        ids += [None] * (len(nodes) - len(ids))
        pushed = {}
        for mid, node in zip(ids, nodes, strict=True):
            if mid:  # Flower returns None for a message it could not push
                pushed[mid] = node
            else:
                logger.warning("could not send the partition query to node %s", node)
        self._asked.update(pushed)
        return set(pushed)
