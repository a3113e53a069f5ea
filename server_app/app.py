"""ServerApp: parse the config, build the experiment, run the strategy, write outputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from e3sfc_core.config import ExperimentConfig
from e3sfc_core.experiment import Experiment

from .strategy import E3SFCStrategy

app = ServerApp()


def _show_progress() -> None:
    """Route the core's per-round lines to stdout (what ``flwr run --stream`` shows)."""
    core = logging.getLogger("e3sfc_core")
    if not core.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        core.addHandler(handler)
    core.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run every round of the configured experiment."""
    _show_progress()
    cfg = ExperimentConfig.from_run_config(context.run_config)
    # Relative paths: against E3SFC_BASE_DIR (set by the e3sfc-run launcher to the user's
    # working directory), else against the ServerApp's working directory.
    base = Path(os.environ.get("E3SFC_BASE_DIR", Path.cwd()))
    experiment = Experiment(cfg, base_dir=base)
    E3SFCStrategy(experiment).start(grid=grid)
    summary = experiment.finalize()
    logging.getLogger("e3sfc_core").info(
        "done: final accuracy %.4f, uplink %d B, downlink %d B, %.1fx less than FedAvg; outputs in %s",
        summary["final_accuracy"] or 0.0,
        summary["total_uplink_bytes"],
        summary["total_downlink_bytes"],
        summary["compression_ratio"] or 0.0,
        experiment.run_dir,
    )
