"""E3SFCStrategy: Flower's Strategy interface over :class:`e3sfc_core.experiment.Experiment`.

``start`` runs the core's round loop (:meth:`Experiment.run`) with the Grid as its
transport (:mod:`server_app.transport`), so a Flower run and the in-process loop are the
same loop. Instructions and replies carry payloads only (no weight arrays either way);
FedAvg's per-round hooks would reject such replies, so the hooks Flower's ABC requires
are not used here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from e3sfc_core.experiment import Experiment
from e3sfc_core.server import RoundRecord

from .transport import GridTransport

logger = logging.getLogger(__name__)


def round_metrics(rec: RoundRecord) -> MetricRecord:
    """The round's headline numbers, as Flower's ``Result`` keeps them."""
    return MetricRecord(
        {
            "accuracy": rec.accuracy,
            "loss": rec.loss,
            "uplink-bytes": rec.uplink_bytes,
            "downlink-bytes": rec.downlink_bytes,
            "dropped": rec.dropped,
        }
    )


class E3SFCStrategy(Strategy):
    """Runs one :class:`Experiment` over a Flower Grid."""

    def __init__(self, experiment: Experiment) -> None:
        self.exp = experiment

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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Not used: the core's loop plans each round (see :meth:`start`)."""
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used: the core's loop aggregates each round (see :meth:`start`)."""
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: it would ship full weights; the server evaluates."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        **_: object,
    ) -> Result:
        """Run the experiment's remaining rounds (the core decides when to stop)."""
        self.summary()
        self.exp.initial_evaluation()
        cfg = self.exp.cfg
        first = len(self.exp.server.records)
        transport = GridTransport(grid, cfg.num_partitions, cfg.min_train_nodes, cfg.round_timeout)
        self.exp.run(transport)
        result = Result()
        for rec in self.exp.server.records[first:]:
            result.train_metrics_clientapp[rec.round] = round_metrics(rec)
        return result
