"""One federated run seen from the server: the round loop (plan, exchange, aggregate,
evaluate, report, checkpoint), its stopping rules, and the outputs.

The loop is written once, here (:meth:`Experiment.run`). The Flower strategy and the
plain-Python loop (:mod:`e3sfc_core.simulate`) are only transports for it
(:mod:`e3sfc_core.transport`), so their outputs are the same files with the same numbers
and every reason to stop early is decided here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .datasets import load_dataset
from .errors import BudgetExhausted
from .payload import dense_size
from .protocol import Instruction, Reply
from .reporting import format_round, plot_runs, read_metrics, summarize, write_metrics, write_summary
from .server import FederatedServer, RoundRecord
from .training import apply_threads, evaluate, resolve_device
from .transport import Transport

logger = logging.getLogger(__name__)


def run_name(cfg: ExperimentConfig) -> str:
    """``run-name`` if set, else ``<method>-<dataset>-<model>-s<seed>``."""
    return cfg.run_name or f"{cfg.method}-{cfg.dataset}-{cfg.model}-s{cfg.seed}"


def resolve_path(path: str, base_dir: Path) -> Path:
    """Relative paths in the config are relative to where the user launched the run."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


class Experiment:
    """Server-side driver of one run, with its output directory."""

    def __init__(self, cfg: ExperimentConfig, base_dir: Path | None = None) -> None:
        self.cfg = cfg
        base = base_dir or Path.cwd()
        apply_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        _, self.test, self.spec = load_dataset(cfg.dataset, resolve_path(cfg.data_root, base), cfg.download)
        self.server = FederatedServer(cfg, self.spec, self.device)
        self.run_dir = resolve_path(cfg.output_dir, base) / run_name(cfg)
        self.checkpoint_path = self.run_dir / "checkpoint.npz"
        self.start_round = 1
        self.started = time.perf_counter()
        self._stopped_early = ""
        if cfg.resume and self.checkpoint_path.exists():
            tensors, meta = load_checkpoint(self.checkpoint_path)
            self.server.load_state_dict(tensors, meta)
            self.start_round = len(self.server.records) + 1
            logger.info("resumed %s at round %d", self.checkpoint_path, self.start_round)
        elif not cfg.resume and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()  # a fresh run must not be resumed from an old one

    @property
    def stopped_early(self) -> str:
        """Why the run ended before its last round ('' if it did not): set by :meth:`run`."""
        return self._stopped_early

    @property
    def rounds(self) -> range:
        """The rounds still to run."""
        return range(self.start_round, self.cfg.num_rounds + 1)

    def initial_evaluation(self) -> tuple[float, float]:
        """Accuracy of the starting model (logged, not a metrics row)."""
        loss, acc = evaluate(self.server.model, self.test, device=self.device)
        logger.info("initial model: accuracy %.4f, loss %.4f", acc, loss)
        return loss, acc

    def run(self, transport: Transport, *, stop_after: int | None = None) -> bool:
        """Run the remaining rounds over ``transport``; the one round loop of the project.

        It stops early, with the reason in ``stopped_early``, when the byte budget is
        spent or when nobody can train. ``stop_after`` ends it after that round without
        a reason, as a crash would (tests of resuming). Returns ``False`` only then, so
        the caller knows not to :meth:`finalize`.
        """
        for server_round in self.rounds:
            roll = transport.roll(server_round)
            for client in roll.rejoined:
                self.server.rejoined(client)
            plan = self._plan(server_round, roll.clients) if roll.clients else {}
            if plan is None:
                break
            if not plan:
                self._stop(server_round, roll.absent or "no client can train")
                break
            self._complete(server_round, transport.exchange(server_round, plan))
            if stop_after is not None and server_round >= stop_after:
                return False
        return True

    def _stop(self, server_round: int, reason: str) -> None:
        """Record why the run ends before ``server_round`` (shown in ``summary.json``)."""
        self._stopped_early = reason
        logger.warning("stopping before round %d: %s", server_round, reason)

    def _plan(self, server_round: int, clients: Sequence[int]) -> dict[int, Instruction] | None:
        """Instructions for the round, or ``None`` when the byte budget is spent."""
        try:
            return self.server.plan_round(server_round, clients)
        except BudgetExhausted as exc:
            self._stop(server_round, str(exc))
            return None

    def _complete(self, server_round: int, replies: Sequence[Reply]) -> RoundRecord:
        """Aggregate, evaluate, report and checkpoint one round."""
        rec = self.server.aggregate_round(server_round, replies)
        loss, acc = evaluate(self.server.model, self.test, device=self.device)
        self.server.finish_round(rec, loss, acc)
        logger.info(format_round(rec))
        write_metrics(self.run_dir / "metrics.csv", self.server.records)
        every = self.cfg.checkpoint_every
        if every and (server_round % every == 0 or server_round == self.cfg.num_rounds):
            save_checkpoint(self.checkpoint_path, *self.server.state_dict())
        return rec

    def finalize(self) -> dict[str, Any]:
        """Write ``summary.json`` and the plots; return the summary."""
        dense = dense_size(self.server.numel)
        summary = summarize(
            self.server.records,
            self.cfg.to_run_config(),
            dense,
            time.perf_counter() - self.started,
            self.server.scheduler.report(),
        )
        summary["stopped_early"] = self.stopped_early
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_summary(self.run_dir / "summary.json", summary)
        if self.server.records:
            rows = read_metrics(self.run_dir / "metrics.csv")
            plot_runs({run_name(self.cfg): rows}, self.run_dir / "accuracy.png")
        return summary
