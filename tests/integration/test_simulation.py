"""``e3sfc-run``: a real Flower simulation (SuperLink + Ray) on loopback, start to finish."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
