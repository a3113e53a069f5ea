"""The Flower strategy + ClientApp, run in-process over a fake grid."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from flwr.app import Error, Message

from e3sfc_core.config import ExperimentConfig
from e3sfc_core.experiment import Experiment
from e3sfc_core.protocol import reply_size
from e3sfc_core.simulate import run_reference
from e3sfc_flower.records import content_bytes, instruction_from
from server_app.strategy import E3SFCStrategy

from .conftest import FakeGrid, with_bytes


def _cfg(tmp_path: Path, **over: object) -> ExperimentConfig:
    base = {
        "num-rounds": 3,
        "local-epochs": 2,
        "output-dir": str(tmp_path / "out"),
        "num-partitions": 4,
        "device": "cpu",
    }
    base.update(over)
    return ExperimentConfig.from_run_config(base)


def _rows(exp: Experiment) -> list[dict[str, str]]:
    with (exp.run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("method", ["e3sfc", "topk"])
def test_flower_path_equals_reference_loop(tmp_path: Path, method: str) -> None:
    # Prepare
    cfg = _cfg(tmp_path, method=method, **{"run-name": "flower"})
    ref_cfg = _cfg(tmp_path, method=method, **{"run-name": "reference"})
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    E3SFCStrategy(exp).start(grid=FakeGrid(cfg, 4))  # type: ignore[arg-type]
    exp.finalize()
    ref, _ = run_reference(ref_cfg, base_dir=tmp_path)
    # Assert: same algorithm, same numbers, whichever runtime drives it
    flower_rows, ref_rows = _rows(exp), _rows(ref)
    assert len(flower_rows) == 3
    for a, b in zip(flower_rows, ref_rows, strict=True):
        for key in ("accuracy", "loss", "uplink_bytes", "downlink_bytes", "mean_cosine"):
            assert a[key] == b[key], key
    assert float(flower_rows[-1]["accuracy"]) > 0.2  # above chance (0.1)
    for name in ("metrics.csv", "summary.json", "accuracy.png"):
        assert (exp.run_dir / name).exists()


def test_bytes_add_up_and_match_message_lengths(tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(tmp_path)
    exp = Experiment(cfg, base_dir=tmp_path)
    grid = FakeGrid(cfg, 4)
    # Execute
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    summary = exp.finalize()
    # Assert: downlink bytes are exactly the bytes of the messages we sent
    assert _downlink_bytes(grid) == summary["total_downlink_bytes"]
    rows = _rows(exp)
    assert int(rows[-1]["cum_uplink_bytes"]) == sum(int(r["uplink_bytes"]) for r in rows)
    bound = 3 * 4 * reply_size(exp.server.payload_size(cfg.synthetic_samples))  # Rice codes vary
    assert 0.9 * bound < summary["total_uplink_bytes"] <= bound
    assert summary["compression_ratio"] > 50


def _garbage(reply: Message) -> Message:
    return with_bytes(reply, b"garbage")


def test_bad_replies_are_dropped_and_counted(tmp_path: Path) -> None:
    # Prepare: node 0 raises (Flower Error), node 1 sends garbage, nodes 2-4 are fine
    cfg = _cfg(tmp_path, **{"num-rounds": 2, "num-partitions": 5})

    def tamper(node: int, reply: Message) -> Message:
        if node == 1000:
            return Message(Error(code=0, reason="simulated crash"), reply_to=_find(grid, node))
        if node == 1001:
            return _garbage(reply)
        return reply

    grid = FakeGrid(cfg, 5, tamper)
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    # Assert
    rows = _rows(exp)
    assert [int(r["dropped"]) for r in rows] == [2, 2]
    assert [int(r["accepted"]) for r in rows] == [3, 3]
    assert all(r["skipped"] == "False" for r in rows)


def test_too_few_valid_replies_skips_round_without_crashing(tmp_path: Path) -> None:
    # Prepare: every reply but one is garbage; min-train-nodes is 2
    cfg = _cfg(tmp_path, **{"num-rounds": 1})
    grid = FakeGrid(cfg, 4, lambda node, r: r if node == 1000 else _garbage(r))
    exp = Experiment(cfg, base_dir=tmp_path)
    before = exp.server.digest
    # Execute
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    # Assert: model unchanged, round recorded as skipped
    assert exp.server.digest == before
    assert _rows(exp)[0]["skipped"] == "True"


def test_missing_replies_count_as_dropped(tmp_path: Path) -> None:
    # Prepare: node 1003 never answers (a straggler past the round timeout)
    cfg = _cfg(tmp_path, **{"num-rounds": 1, "round-timeout": 0.5})
    grid = FakeGrid(cfg, 4, lambda node, r: None if node == 1003 else r)  # type: ignore[arg-type,return-value]
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    # Assert
    row = _rows(exp)[0]
    assert (int(row["accepted"]), int(row["dropped"])) == (3, 1)


def _downlink_bytes(grid: FakeGrid) -> int:
    """What the server's train messages carried: ``len()`` of each encoded instruction."""
    return sum(len(content_bytes(m.content)) for m in grid.sent if m.metadata.message_type == "train")


def _find(grid: FakeGrid, node: int) -> Message:
    return [m for m in grid.sent if m.metadata.dst_node_id == node][-1]


def test_partial_participation_replays_missed_downlinks_and_counts_them(tmp_path: Path) -> None:
    # Prepare: half of the clients per round, so clients miss rounds and must catch up
    cfg = _cfg(tmp_path, **{"num-rounds": 5, "fraction-train": 0.5, "local-epochs": 1})
    grid = FakeGrid(cfg, 4)
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    # Assert: someone replayed several compressed downlinks (cheaper than full weights),
    # nobody desynced, and every replayed byte is in the metrics
    counts = [len(instruction_from(m).downlink) for m in grid.sent]
    assert max(counts) >= 2
    rows = _rows(exp)
    assert all(r["desynced"] == "0" and r["full_syncs"] == "0" and r["accepted"] == "2" for r in rows)
    assert _downlink_bytes(grid) == sum(int(r["downlink_bytes"]) for r in rows)


def test_relayed_downlink_through_flower_equals_reference_loop(tmp_path: Path) -> None:
    # Prepare: relayed downlinks with partial participation (clients replay missed bundles)
    over = {"downlink": "relay", "synthetic-samples": 1, "fraction-train": 0.5, "local-epochs": 1}
    cfg = _cfg(tmp_path, **over, **{"run-name": "flower"})
    ref_cfg = _cfg(tmp_path, **over, **{"run-name": "reference"})
    exp = Experiment(cfg, base_dir=tmp_path)
    # Execute
    E3SFCStrategy(exp).start(grid=FakeGrid(cfg, 4))  # type: ignore[arg-type]
    ref, _ = run_reference(ref_cfg, base_dir=tmp_path)
    # Assert: same numbers in both runtimes, and nobody ever fell out of sync
    flower_rows, ref_rows = _rows(exp), _rows(ref)
    for a, b in zip(flower_rows, ref_rows, strict=True):
        for key in ("accuracy", "loss", "uplink_bytes", "downlink_bytes", "desynced"):
            assert a[key] == b[key], key
    assert all(r["desynced"] == "0" and r["accepted"] == "2" for r in flower_rows)
