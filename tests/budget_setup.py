"""The budgeted federation the end-to-end budget tests share (in process and through the
Flower apps): 6 clients, half sampled per round, a budget that needs every round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e3sfc_core.config import ExperimentConfig

# Enough for every round at n_min plus the one full-weights re-sync a desync forces
# (220,868 B for the digits MLP), less than every round at n_max: it needs all rounds.
TOTAL = 450_000


def budget_config(tmp: Path, **over: Any) -> ExperimentConfig:
    """The shared config, outputs under ``tmp``, with ``over`` on top."""
    raw = {
        "num-rounds": 6,
        "num-partitions": 6,
        "fraction-train": 0.5,
        "local-epochs": 1,
        "max-evals": 5,
        "synthetic-samples-max": 12,
        "budget-total-bytes": TOTAL,
        "device": "cpu",
        "num-threads": 1,
        "output-dir": str(tmp / "out"),
        **over,
    }
    return ExperimentConfig.from_run_config(raw)
