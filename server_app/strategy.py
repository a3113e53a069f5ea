"""E3SFCStrategy: Flower's Strategy interface over :class:`e3sfc_core.experiment.Experiment`.

It sends instructions and receives payload-only replies (no weight arrays either way), so
it implements ``aggregate_train`` itself: FedAvg's reply validation would reject them.
The experiment samples partition ids, not Flower's random node IDs: each round starts by
asking new nodes for their partition (:mod:`server_app.discovery`), and the instructions
and replies are mapped between partitions and nodes here.
``start`` is overridden only to poll for replies every 0.2 s instead of Flower's 3 s and to
stop cleanly when the byte budget is spent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from e3sfc_core.experiment import Experiment

from .discovery import PartitionDiscovery
from .records import instruction_content, reply_from

logger = logging.getLogger(__name__)
POLL_SECONDS = 0.2


class E3SFCStrategy(Strategy):
    """Drives one :class:`Experiment` round by round."""

    def __init__(self, experiment: Experiment) -> None:
        self.exp = experiment
        self.discovery = PartitionDiscovery(experiment.cfg.num_partitions, experiment.cfg.round_timeout)
        self._connected = 0

    def summary(self) -> None:
        """Log what will run."""
        cfg = self.exp.cfg
        logger.info(
            "E3SFCStrategy: method=%s dataset=%s model=%s rounds=%d downlink=%s budget=%d",
            cfg.method,
            cfg.dataset,
            cfg.model,
            cfg.num_rounds,
            cfg.downlink,
            cfg.budget_total_bytes,
        )

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """Node IDs once at least ``min-train-nodes`` are connected (bounded wait)."""
        deadline = time.monotonic() + self.exp.cfg.round_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.exp.cfg.min_train_nodes or time.monotonic() > deadline:
                return nodes
            time.sleep(POLL_SECONDS)

    def _partitions(self, grid: Grid) -> list[int]:
        """Partitions served by connected nodes, after asking new nodes which is theirs."""
        nodes = self._wait_for_nodes(grid)
        self._connected = len(nodes)
        admission = self.discovery.refresh(grid, nodes)
        for pid in admission.rejoined:
            self.exp.server.rejoined(pid)
        return self.discovery.roster.partitions()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled partition, to the node serving it: its
        instruction and downlink payloads."""
        plan = self.exp.plan(server_round, self._partitions(grid))
        if plan is None:
            return []
        node_of = self.discovery.roster.node_of
        logger.info("round %d: partitions %s", server_round, sorted(plan))
        return [
            Message(instruction_content(instr), dst_node_id=node_of(pid), message_type=MessageType.TRAIN)
            for pid, instr in plan.items()
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand every reply (errors included) to the experiment; report round metrics."""
        keyed = self.discovery.roster.keyed_by_partition
        rec = self.exp.complete(server_round, [keyed(reply_from(m)) for m in replies])
        metrics = MetricRecord(
            {
                "accuracy": rec.accuracy,
                "loss": rec.loss,
                "uplink-bytes": rec.uplink_bytes,
                "downlink-bytes": rec.downlink_bytes,
                "dropped": rec.dropped,
            }
        )
        return None, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: it would ship full weights; the server evaluates."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def _send_and_receive(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Push, then pull every 0.2 s until all replies are in or the round times out."""
        pending = set(grid.push_messages(messages))
        deadline = time.monotonic() + self.exp.cfg.round_timeout
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            got = list(grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(POLL_SECONDS)
        if pending:
            logger.warning(
                "%d client(s) did not answer within %.0f s", len(pending), self.exp.cfg.round_timeout
            )
        return replies

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        **_: object,
    ) -> Result:
        """Run the experiment's remaining rounds; stops early when the budget is spent."""
        self.summary()
        self.exp.initial_evaluation()
        result = Result()
        for server_round in self.exp.rounds:
            messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
            if not messages:
                if not self.exp.stopped_early:  # not the budget: nobody to train
                    self.exp.stopped_early = (
                        f"none of the {self._connected} connected SuperNode(s) reported a valid partition"
                        if self._connected
                        else f"no SuperNode connected within {self.exp.cfg.round_timeout:.0f} s"
                    )
                    logger.warning("stopping before round %d: %s", server_round, self.exp.stopped_early)
                break
            _arrays, metrics = self.aggregate_train(server_round, self._send_and_receive(grid, messages))
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
        return result
