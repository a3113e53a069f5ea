"""Which deployed node serves which data partition.

Flower draws node IDs at random in every run, so sampling over node IDs trains different
clients in two runs with the same seed. Partition ids are fixed by each node's config, and
the in-process loop's clients *are* partitions. So the server samples partition ids in
both runtimes and the Flower glue uses this roster to send each sampled partition's
instruction to the node that reported it (and to key replies by partition again).
Framework-free: the glue asks the nodes and hands their answers here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .protocol import STATUS_ERROR, PartitionAnswer, Reply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """Outcome of :meth:`Roster.admit`."""

    admitted: dict[int, int] = field(default_factory=dict)  # node -> partition
    rejoined: list[int] = field(default_factory=list)  # partitions now served by another node
    rejected: dict[int, str] = field(default_factory=dict)  # node -> reason


class Roster:
    """Partition id <-> node id map of the nodes that are connected now."""

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = num_partitions
        self._partition_of: dict[int, int] = {}  # node -> partition (connected nodes)
        self._last_node: dict[int, int] = {}  # partition -> the node that last served it

    def partitions(self) -> list[int]:
        """Partitions served by a connected, admitted node (sorted)."""
        return sorted(self._partition_of.values())

    def node_of(self, partition_id: int) -> int:
        """The node serving ``partition_id`` (KeyError if none)."""
        for node, pid in self._partition_of.items():
            if pid == partition_id:
                return node
        raise KeyError(f"no connected node serves partition {partition_id}")

    def partition_of(self, node_id: int) -> int | None:
        """The partition ``node_id`` serves, or ``None`` if it is not admitted."""
        return self._partition_of.get(node_id)

    def retain(self, connected: Iterable[int]) -> list[int]:
        """Forget nodes that are no longer connected; returns the partitions they freed."""
        alive = set(connected)
        gone = sorted(n for n in self._partition_of if n not in alive)
        freed = [self._partition_of.pop(n) for n in gone]
        if gone:
            logger.warning("node(s) %s left; partition(s) %s unserved until a node reports them", gone, freed)
        return freed

    def unknown(self, connected: Iterable[int]) -> list[int]:
        """Connected nodes that have not been admitted (to be asked for their partition)."""
        return sorted(n for n in set(connected) if n not in self._partition_of)

    def admit(self, answers: Mapping[int, PartitionAnswer]) -> Admission:
        """Validate nodes' answers and map the valid ones.

        A partition outside ``[0, num-partitions)``, a node whose ``num-partitions`` differs
        from the run's (its data split would differ), a partition another connected node
        already serves, or one that several new nodes claim at once is rejected with an
        error naming the node; rejected nodes are asked again in a later round (a node
        restarted under a new ID is admitted once the old one has gone).
        """
        rejected: dict[int, str] = {}
        claims: dict[int, list[int]] = {}
        for node, ans in sorted(answers.items()):
            if node in self._partition_of:
                continue  # already admitted (a duplicate answer)
            reason = self._invalid(ans)
            if reason:
                rejected[node] = reason
            else:
                claims.setdefault(ans.partition_id, []).append(node)
        admitted: dict[int, int] = {}
        rejoined: list[int] = []
        served = {p: n for n, p in self._partition_of.items()}
        for pid, nodes in sorted(claims.items()):
            if pid in served:
                for node in nodes:
                    rejected[node] = f"partition {pid} is already served by node {served[pid]}"
            elif len(nodes) > 1:
                for node in nodes:
                    rejected[node] = f"partition {pid} is reported by nodes {nodes} at once"
            else:
                node = nodes[0]
                if self._last_node.get(pid, node) != node:
                    rejoined.append(pid)
                self._partition_of[node] = pid
                self._last_node[pid] = node
                admitted[node] = pid
        for node, reason in sorted(rejected.items()):
            logger.error("node %s rejected: %s", node, reason)
        return Admission(admitted, rejoined, rejected)

    def _invalid(self, ans: PartitionAnswer) -> str:
        """Why an answer cannot be used ('' if it can)."""
        if ans.num_partitions != self.num_partitions:
            return (
                f"it reports num-partitions={ans.num_partitions}, the run has {self.num_partitions}"
                " (set the same num-partitions in the run config and every node-config)"
            )
        if not 0 <= ans.partition_id < self.num_partitions:
            return f"partition-id {ans.partition_id} is outside [0, {self.num_partitions})"
        return ""

    def keyed_by_partition(self, reply: Reply) -> Reply:
        """``reply`` (keyed by node ID) keyed by the partition its node serves, as the
        server's bookkeeping is. A node that is not admitted, or whose reply names another
        partition than the one it reported, becomes an error reply the server drops."""
        pid = self._partition_of.get(reply.node_id)
        if pid is None:
            error = f"reply from node {reply.node_id}, which serves no known partition"
            return dataclasses.replace(reply, node_id=-1, status=STATUS_ERROR, error=error)
        if reply.status != STATUS_ERROR and reply.partition_id != pid:
            error = f"node {reply.node_id} replied for partition {reply.partition_id}, it serves {pid}"
            return dataclasses.replace(reply, node_id=pid, status=STATUS_ERROR, error=error)
        return dataclasses.replace(reply, node_id=pid)
