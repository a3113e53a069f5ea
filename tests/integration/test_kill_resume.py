"""A process killed with SIGKILL resumes from its last checkpoint (server) and state files
(clients) and ends where an uninterrupted run with the same seed ends (within one point)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ARGS = ["num-rounds=8", "checkpoint-every=1", "local-epochs=2", "num-partitions=5", "device=cpu"]


def _simulate(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "e3sfc_core.simulate",
            "--state-dir",
            str(out / "clients"),
            *ARGS,
            f"output-dir={out}",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _final_accuracy(out: Path) -> float:
    summary = json.loads((out / "e3sfc-digits-mlp-s0" / "summary.json").read_text())
    return float(summary["final_accuracy"])


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    # Prepare: the reference run
    ref = _simulate(tmp_path / "ref")
    assert ref.wait(timeout=300) == 0
    # Execute: kill -9 once round 4 has been reported (its checkpoint is on disk) ...
    victim = _simulate(tmp_path / "run")
    deadline = time.monotonic() + 300
    assert victim.stdout is not None
    try:
        for line in victim.stdout:
            if line.startswith("round   4 |") or time.monotonic() > deadline:
                break
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait(timeout=30)
    rows = (tmp_path / "run" / "e3sfc-digits-mlp-s0" / "metrics.csv").read_text().splitlines()
    assert 4 <= len(rows) <= 6  # header + 3 to 5 rounds: the run really stopped early
    # ... and resume it
    resumed = _simulate(tmp_path / "run", "resume=true")
    output = resumed.communicate(timeout=300)[0]
    # Assert
    assert resumed.returncode == 0, output[-2000:]
    metrics = (tmp_path / "run" / "e3sfc-digits-mlp-s0" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == [str(r) for r in range(1, 9)]
    assert abs(_final_accuracy(tmp_path / "run") - _final_accuracy(tmp_path / "ref")) <= 0.01
