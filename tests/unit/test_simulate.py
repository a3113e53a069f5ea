"""The plain-Python federated loop (e3sfc_core.simulate.run_reference): outputs, byte
accounting, learning, checkpoint/resume and fault injection, on digits."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from e3sfc_core.config import ExperimentConfig
from e3sfc_core.experiment import Experiment, run_name
from e3sfc_core.models import build_model
from e3sfc_core.protocol import Instruction, Reply, reply_size
from e3sfc_core.simulate import run_reference
from e3sfc_core.tensors import digest_flat, get_flat
from e3sfc_core.training import evaluate
from e3sfc_core.transport import Roll


def config(tmp: Path, **overrides: Any) -> ExperimentConfig:
    raw = {
        "method": "3sfc",
        "num-rounds": 3,
        "num-partitions": 4,
        "local-epochs": 1,
        "device": "cpu",
        "seed": 0,
        "output-dir": str(tmp / "outputs"),
    }
    raw.update(overrides)
    return ExperimentConfig.from_run_config(raw)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def three_rounds(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExperimentConfig, Experiment, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sim")
    cfg = config(tmp)
    exp, summary = run_reference(cfg, base_dir=tmp)
    return cfg, exp, summary


def test_run_writes_the_three_outputs(
    three_rounds: tuple[ExperimentConfig, Experiment, dict[str, Any]],
) -> None:
    # Prepare
    cfg, exp, _ = three_rounds

    # Execute
    run_dir = exp.run_dir

    # Assert
    assert run_dir.name == run_name(cfg) == "3sfc-digits-mlp-s0"
    assert (run_dir / "metrics.csv").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_rows_and_cumulative_bytes(
    three_rounds: tuple[ExperimentConfig, Experiment, dict[str, Any]],
) -> None:
    # Prepare
    cfg, exp, _ = three_rounds

    # Execute
    rows = read_rows(exp.run_dir / "metrics.csv")

    # Assert
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    for direction in ("uplink", "downlink"):
        per_round = [int(r[f"{direction}_bytes"]) for r in rows]
        cum = [int(r[f"cum_{direction}_bytes"]) for r in rows]
        assert cum == [sum(per_round[: i + 1]) for i in range(len(rows))]
    uplink = reply_size(exp.server.payload_size(cfg.synthetic_samples))  # n = synthetic-samples
    assert all(int(r["n_uplink"]) == cfg.synthetic_samples for r in rows)
    # 4 replies; the correction's positions are Rice-coded, so a reply is at most its bound
    assert all(0.9 * 4 * uplink < int(r["uplink_bytes"]) <= 4 * uplink for r in rows)
    assert all(r["skipped"] == "False" and int(r["accepted"]) == 4 for r in rows)
    assert all(0.0 < float(r["mean_cosine"]) <= 1.0 for r in rows)


def test_summary_totals_equal_the_sums(
    three_rounds: tuple[ExperimentConfig, Experiment, dict[str, Any]],
) -> None:
    # Prepare
    _, exp, summary = three_rounds
    rows = read_rows(exp.run_dir / "metrics.csv")
    stored = json.loads((exp.run_dir / "summary.json").read_text())

    # Execute
    up = sum(int(r["uplink_bytes"]) for r in rows)
    down = sum(int(r["downlink_bytes"]) for r in rows)

    # Assert
    assert stored["total_uplink_bytes"] == summary["total_uplink_bytes"] == up
    assert stored["total_downlink_bytes"] == summary["total_downlink_bytes"] == down
    assert stored["total_bytes"] == up + down
    assert stored["total_bytes"] == int(rows[-1]["cum_uplink_bytes"]) + int(rows[-1]["cum_downlink_bytes"])
    assert stored["final_accuracy"] == pytest.approx(float(rows[-1]["accuracy"]))


def test_learns_above_chance(three_rounds: tuple[ExperimentConfig, Experiment, dict[str, Any]]) -> None:
    # Prepare
    cfg, exp, summary = three_rounds
    initial = build_model(cfg.model, tuple(exp.spec.input_shape), exp.spec.n_classes, cfg.seed)

    # Execute
    accuracy = summary["final_accuracy"]
    _, initial_accuracy = evaluate(initial, exp.test, device=torch.device("cpu"))

    # Assert
    assert accuracy > 0.2
    assert accuracy > initial_accuracy + 0.1


def run_interrupted(
    tmp: Path, cfg: ExperimentConfig, stop_after: int, state_dir: Path | None
) -> tuple[Experiment, dict[str, Any]]:
    first, partial = run_reference(cfg, base_dir=tmp, stop_after=stop_after, state_dir=state_dir)
    assert partial == {}
    assert first.checkpoint_path.is_file()
    assert not (first.run_dir / "summary.json").exists()
    assert len(read_rows(first.run_dir / "metrics.csv")) == stop_after
    return run_reference(cfg.model_copy(update={"resume": True}), base_dir=tmp, state_dir=state_dir)


@pytest.mark.parametrize("method", ["3sfc", "e3sfc"])
def test_resume_with_client_state_continues_exactly(tmp_path: Path, method: str) -> None:
    # Prepare
    rounds = 4
    straight_cfg = config(tmp_path, method=method, **{"num-rounds": rounds, "run-name": "straight"})
    cfg = config(
        tmp_path, method=method, **{"num-rounds": rounds, "checkpoint-every": 1, "run-name": "resumed"}
    )
    straight, straight_summary = run_reference(straight_cfg, base_dir=tmp_path)

    # Execute
    resumed, summary = run_interrupted(tmp_path, cfg, stop_after=2, state_dir=tmp_path / "client-states")

    # Assert
    assert resumed.start_round == 3
    rows = read_rows(resumed.run_dir / "metrics.csv")
    assert [int(r["round"]) for r in rows] == list(range(1, rounds + 1))
    assert abs(summary["final_accuracy"] - straight_summary["final_accuracy"]) <= 0.01
    # with the client states on disk the resumed run is the same run
    assert [r.accuracy for r in resumed.server.records] == [r.accuracy for r in straight.server.records]
    assert digest_flat(get_flat(resumed.server.model)) == digest_flat(get_flat(straight.server.model))
    assert summary["total_bytes"] == straight_summary["total_bytes"]


def test_resume_without_client_state_still_finishes(tmp_path: Path) -> None:
    # Prepare: the clients lose everything (fresh nodes), the server resumes its checkpoint
    cfg = config(tmp_path, method="e3sfc", **{"num-rounds": 4, "checkpoint-every": 1})

    # Execute
    resumed, summary = run_interrupted(tmp_path, cfg, stop_after=2, state_dir=None)

    # Assert
    rows = read_rows(resumed.run_dir / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    assert int(rows[-1]["accepted"]) == 4  # re-synced by the last round
    assert summary["rounds"] == 4
    assert summary["total_bytes"] == sum(int(r["uplink_bytes"]) + int(r["downlink_bytes"]) for r in rows)


def test_fresh_run_discards_an_old_checkpoint(tmp_path: Path) -> None:
    # Prepare
    cfg = config(tmp_path, **{"num-rounds": 2, "checkpoint-every": 1})
    first, _ = run_reference(cfg, base_dir=tmp_path, stop_after=1)
    assert first.checkpoint_path.is_file()

    # Execute
    again = Experiment(cfg, tmp_path)

    # Assert
    assert again.start_round == 1
    assert not again.checkpoint_path.exists()


def test_corrupted_uplink_is_dropped_and_the_round_goes_on(tmp_path: Path) -> None:
    # Prepare: node 1's payload arrives with a corrupted magic
    def hook(server_round: int, instruction: Instruction, reply: Reply) -> Reply:
        if reply.node_id != 1:
            return reply
        data = bytearray(reply.payload)
        data[0] ^= 0xFF  # bad magic
        return replace(reply, payload=bytes(data))

    cfg = config(tmp_path, **{"num-rounds": 2})

    # Execute
    exp, summary = run_reference(cfg, base_dir=tmp_path, reply_hook=hook)

    # Assert
    assert [r.dropped for r in exp.server.records] == [1, 1]
    assert [r.accepted for r in exp.server.records] == [3, 3]
    assert summary["dropped_replies"] == 2
    assert summary["skipped_rounds"] == 0


def test_fedavg_equivalent_bytes_are_what_fedavg_really_sends(tmp_path: Path) -> None:
    # Prepare: the same federation run by E-3SFC and by FedAvg
    common = {"num-rounds": 3, "num-partitions": 3, "max-evals": 2, "local-epochs": 1, "num-threads": 1}
    e3 = ExperimentConfig.from_run_config({**common, "output-dir": str(tmp_path / "e3")})
    fed = ExperimentConfig.from_run_config(
        {**common, "method": "fedavg", "output-dir": str(tmp_path / "fed")}
    )

    # Execute
    _, e3_summary = run_reference(e3)
    _, fed_summary = run_reference(fed)

    # Assert: FedAvg sends no round-1 downlink, and the equivalent counts none either
    assert e3_summary["fedavg_equivalent_bytes"] == fed_summary["total_bytes"]


class _Absent:
    """A transport with nobody there (and one partition that moved to a new process)."""

    def __init__(self) -> None:
        self.exchanged = 0

    def roll(self, server_round: int) -> Roll:
        return Roll(clients=[], rejoined=[2], absent="nobody came")

    def exchange(self, server_round: int, plan: Mapping[int, Instruction]) -> list[Reply]:
        self.exchanged += 1
        return []


def test_the_core_loop_stops_with_the_transports_reason_when_nobody_can_train(tmp_path: Path) -> None:
    # Prepare
    exp = Experiment(config(tmp_path), base_dir=tmp_path)
    transport = _Absent()
    # Execute
    finished = exp.run(transport)
    # Assert: no round ran, the reason is the run's, and the rejoined client will be re-synced
    assert finished and transport.exchanged == 0 and exp.server.records == []
    assert exp.stopped_early == "nobody came"
    assert exp.server.synced[2] is None
