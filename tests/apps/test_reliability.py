"""Faults through the real strategy and ClientApp: bad replies, abusive updates, desync."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from flwr.app import Array, Error, Message

from e3sfc_core.config import ExperimentConfig
from e3sfc_core.experiment import Experiment
from e3sfc_core.payload import CorrectedBody, TernaryBody, decode, encode
from e3sfc_core.protocol import Reply
from e3sfc_flower.records import STATE_RESIDUAL, content_bytes, instruction_from
from server_app.strategy import E3SFCStrategy

from .conftest import FakeGrid, with_bytes, with_payload


def _cfg(tmp_path: Path, **over: object) -> ExperimentConfig:
    base = {"local-epochs": 2, "output-dir": str(tmp_path / "out"), "device": "cpu"}
    base.update(over)
    return ExperimentConfig.from_run_config(base)


def _run(cfg: ExperimentConfig, grid: FakeGrid, tmp_path: Path) -> list[dict[str, str]]:
    exp = Experiment(cfg, base_dir=tmp_path)
    E3SFCStrategy(exp).start(grid=grid)  # type: ignore[arg-type]
    with (exp.run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_training_converges_with_30_percent_bad_replies(tmp_path: Path) -> None:
    # Prepare: each round 3 of 10 clients fail in rotating ways (crash, garbage, truncated)
    cfg = _cfg(tmp_path, **{"num-rounds": 12, "num-partitions": 10})

    def tamper(node: int, reply: Message) -> Message:
        server_round = (len(grid.sent) - 1) // 10 + 1
        kind = (node - 1000 - 3 * server_round) % 10  # three different nodes each round
        if kind == 0:
            return Message(Error(code=0, reason="crashed"), reply_to=grid.sent[-1])
        if kind == 1:
            return with_payload(reply, b"\x00" * 64)
        if kind == 2:
            data = content_bytes(reply.content)
            return with_bytes(reply, data[: len(data) // 2])
        return reply

    grid = FakeGrid(cfg, 10, tamper)
    clean_cfg = _cfg(tmp_path, **{"num-rounds": 12, "num-partitions": 10, "run-name": "clean"})
    # Execute
    rows = _run(cfg, grid, tmp_path)
    clean = _run(clean_cfg, FakeGrid(clean_cfg, 10), tmp_path)
    # Assert: every round lost exactly its 3 bad replies, none was skipped, and it learned
    # about as well as the same run without faults
    assert all(int(r["dropped"]) == 3 and r["skipped"] == "False" for r in rows)
    assert float(rows[-1]["accuracy"]) > 0.7
    assert float(rows[-1]["accuracy"]) > float(clean[-1]["accuracy"]) - 0.1


def _amplify(scale_factor: float):  # type: ignore[no-untyped-def]
    def tamper(node: int, reply: Message) -> Message:
        if node != 1000 or reply.has_error():
            return reply
        p = decode(Reply.decode(0, content_bytes(reply.content)).payload)
        body = p.body
        assert isinstance(body, CorrectedBody)  # the default: a batch and a sparse correction
        correction = body.correction
        if isinstance(correction, TernaryBody):  # the default: one magnitude (float32)
            correction = dataclasses.replace(correction, magnitude=correction.magnitude * scale_factor)
        else:
            values = (correction.values * scale_factor).clamp(-6e4, 6e4)  # float16 range
            correction = dataclasses.replace(correction, values=values)
        batch = body.synthetic
        assert batch is not None  # the MLP's batch always explains more than the correction alone
        batch = dataclasses.replace(batch, scale=batch.scale * scale_factor)
        scaled = CorrectedBody(batch, correction)
        return with_payload(reply, encode(dataclasses.replace(p, body=scaled)))

    return tamper


def test_scaled_up_malicious_update_is_clipped(tmp_path: Path) -> None:
    # Prepare: client 0 multiplies its (valid, well-formed) update by 10^4 every round
    rounds = {"num-rounds": 4, "num-partitions": 5, "downlink": "dense"}
    clipped_cfg = _cfg(tmp_path, **rounds, **{"run-name": "clipped", "clip-norm-factor": 3.0})
    open_cfg = _cfg(tmp_path, **rounds, **{"run-name": "open", "clip-norm-factor": 0.0})
    # Execute
    clipped_grid = FakeGrid(clipped_cfg, 5, _amplify(1e4))
    clipped = _run(clipped_cfg, clipped_grid, tmp_path)
    unclipped = _run(open_cfg, FakeGrid(open_cfg, 5, _amplify(1e4)), tmp_path)
    # Assert: with clipping the attack is bounded and training proceeds (well above the 10%
    # of chance; the tampered node's error feedback, told how little of its update was
    # applied, keeps the rest, so its later payloads carry stale error, clipped as well);
    # without clipping the attack wrecks the model
    assert all(int(r["clipped"]) == 1 for r in clipped)
    # every round after the first tells the attacker how little of its update was applied
    told = [instruction_from(m).applied_scale for m in clipped_grid.sent if m.metadata.dst_node_id == 1000]
    assert told[0] == 1.0 and all(0.0 < s < 1e-2 for s in told[1:]) and len(told) == 4
    assert float(clipped[-1]["accuracy"]) > 0.3
    assert float(unclipped[-1]["accuracy"]) < float(clipped[-1]["accuracy"]) - 0.2


def test_desynced_client_is_detected_and_resynced_with_full_weights(tmp_path: Path) -> None:
    # Prepare: after round 1, node 1002's stored copy of the global model is corrupted
    cfg = _cfg(tmp_path, **{"num-rounds": 3, "num-partitions": 4})
    grid = FakeGrid(cfg, 4)
    exp = Experiment(cfg, base_dir=tmp_path)
    strategy = E3SFCStrategy(exp)
    real_push = grid.push_messages

    def push(messages):  # type: ignore[no-untyped-def]
        if len(grid.sent) == 4:  # start of round 2
            rec = grid.contexts[1002].state.array_records[STATE_RESIDUAL]
            w = rec["weights"].numpy().copy()
            w[0] += 1.0
            rec["weights"] = Array(w)
        return real_push(messages)

    grid.push_messages = push  # type: ignore[method-assign]
    # Execute
    strategy.start(grid=grid)  # type: ignore[arg-type]
    # Assert: round 2 reports the desync, round 3 re-sends full weights to that node only
    with (exp.run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["desynced"]) for r in rows] == [0, 1, 0]
    assert [int(r["full_syncs"]) for r in rows] == [0, 0, 1]
    full = len(exp.server.full_weights())
    assert int(rows[2]["downlink_bytes"]) > full  # the re-sync is counted
    assert int(rows[2]["accepted"]) == 4
