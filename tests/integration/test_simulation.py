"""``e3sfc-run``: a real Flower simulation (SuperLink + Ray) on loopback, start to finish."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from e3sfc_core.config import ExperimentConfig
from e3sfc_core.experiment import Experiment
from e3sfc_core.simulate import run_reference

from .procs import flower_processes_mentioning

pytestmark = pytest.mark.integration
LAUNCH = [sys.executable, "-m", "e3sfc_launch.run"]


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        LAUNCH + args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _flower_then_in_process(
    over: dict[str, Any], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], Experiment, dict[str, Any]]:
    """``over`` run by ``e3sfc-run`` on 4 simulated SuperNodes (outputs under
    ``tmp_path/runs``), then by the in-process loop with 4 partitions."""
    args = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in over.items()]
    proc = _run(
        [*args, 'output-dir="runs"', "--num-supernodes", "4", "--flwr-home", str(tmp_path / "home")],
        cwd=tmp_path,
    )
    ref_cfg = ExperimentConfig.from_run_config(
        {**over, "num-partitions": 4, "output-dir": str(tmp_path / "ref")}
    )
    ref, summary = run_reference(ref_cfg, base_dir=tmp_path)
    return proc, ref, summary


def test_run_streams_rounds_writes_outputs_and_leaves_nothing_running(tmp_path: Path) -> None:
    # Prepare
    home = tmp_path / "flwr-home"
    # Execute (relative output-dir: must land under the directory we launched from)
    proc = _run(
        [
            "num-rounds=3",
            "local-epochs=2",
            'output-dir="runs"',
            "--num-supernodes",
            "3",
            "--flwr-home",
            str(home),
        ],
        cwd=tmp_path,
    )
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "round   3 |" in proc.stdout and "finished:completed" in proc.stdout
    run_dir = tmp_path / "runs" / "e3sfc-digits-mlp-s0"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["accuracy"]) > 0.2
    # server (one process) and clients (Ray workers) hold bit-identical models: no re-syncs
    assert all(r["desynced"] == "0" and r["full_syncs"] == "0" for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_uplink_bytes"] == sum(int(r["uplink_bytes"]) for r in rows)
    assert (run_dir / "accuracy.png").stat().st_size > 0
    assert flower_processes_mentioning(home) == []


def test_half_sampled_flower_run_equals_the_in_process_loop(tmp_path: Path) -> None:
    # Prepare: half of 4 clients per round; one torch thread on both sides, so that local
    # training is bit-identical in a Ray worker and here
    over = {"num-rounds": 3, "local-epochs": 1, "fraction-train": 0.5, "num-threads": 1, "device": "cpu"}
    # Execute: a real simulation (Flower draws the node IDs), then the in-process loop
    proc, ref, _ = _flower_then_in_process(over, tmp_path)
    # Assert: the same partitions trained every round, so the same numbers (timing aside)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timing = {"compress_seconds", "train_seconds", "aggregate_seconds"}

    def rows(path: Path) -> list[dict[str, str]]:
        with path.open() as fh:
            return [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(fh)]

    flower = rows(tmp_path / "runs" / "e3sfc-digits-mlp-s0" / "metrics.csv")
    assert len(flower) == 3 and all(r["sampled"] == "2" for r in flower)
    assert flower == rows(ref.run_dir / "metrics.csv")


def test_budgeted_half_sampled_flower_run_spends_its_budget_as_the_in_process_loop(tmp_path: Path) -> None:
    # Prepare: a 40 kB budget for 3 rounds of half of 4 clients, the adaptive policy
    over = {
        "num-rounds": 3,
        "local-epochs": 1,
        "fraction-train": 0.5,
        "num-threads": 1,
        "device": "cpu",
        "budget-total-bytes": 40_000,
        "budget-policy": "adaptive",
    }
    # Execute: a real simulation, then the in-process loop with the same config
    proc, _, ref_summary = _flower_then_in_process(over, tmp_path)
    # Assert: every message's bytes counted, within the budget and at least 95% of it,
    # and the same plans and bytes as the in-process loop
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "e3sfc-digits-mlp-s0"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    budget = json.loads((run_dir / "summary.json").read_text())["budget"]
    spent = sum(int(r["uplink_bytes"]) + int(r["downlink_bytes"]) for r in rows)
    assert budget["spent_total"] == spent
    assert 0.95 * 40_000 <= spent <= 40_000
    assert budget == ref_summary["budget"]


def test_bad_value_fails_before_anything_starts(tmp_path: Path) -> None:
    proc = _run(['method="zip"'], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "method" in proc.stderr and "e3sfc" in proc.stderr


def test_failed_run_exits_nonzero(tmp_path: Path) -> None:
    # mnist is not on disk here and downloads are off: the ServerApp fails
    home = tmp_path / "flwr-home"
    proc = _run(
        [
            'dataset="mnist"',
            f'data-root="{tmp_path / "nodata"}"',
            "--num-supernodes",
            "2",
            "--flwr-home",
            str(home),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "finished:completed" not in proc.stdout
    assert flower_processes_mentioning(home) == []
