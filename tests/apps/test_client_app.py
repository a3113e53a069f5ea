"""The ClientApp handler called directly with hand-built messages and contexts."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import train
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.datasets import get_spec
from e3sfc_core.errors import PayloadError
from e3sfc_core.payload import decode
from e3sfc_core.protocol import Instruction
from e3sfc_core.server import FederatedServer
from e3sfc_core.training import resolve_device
from e3sfc_flower.records import STATE_RESIDUAL, instruction_content, message_content, reply_from


def _setup(tmp_path: Path, node_config: dict | None = None) -> tuple[FederatedServer, Context, Instruction]:
    cfg = ExperimentConfig.from_run_config({"local-epochs": 1, "device": "cpu"})
    server = FederatedServer(cfg, get_spec("digits"), resolve_device("cpu"))
    instruction = server.plan_round(1, [7])[7]
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config=node_config or {"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )
    return server, ctx, instruction


def _message(instruction: Instruction) -> Message:
    return Message(instruction_content(instruction), dst_node_id=7, message_type=MessageType.TRAIN)


def test_train_replies_with_payload_and_saves_state(tmp_path: Path) -> None:
    # Prepare
    server, ctx, instruction = _setup(tmp_path)
    # Execute
    reply = reply_from(train(_message(instruction), ctx))
    # Assert
    assert reply.status == "ok" and reply.num_examples > 0
    assert 0.9 * instruction.max_uplink_bytes < len(reply.payload) <= instruction.max_uplink_bytes
    assert decode(reply.payload).base_digest == server.digest
    assert STATE_RESIDUAL in ctx.state.array_records
    assert set(ctx.state.array_records[STATE_RESIDUAL].keys()) >= {"weights", "residual", "pending"}


def test_malformed_instruction_raises_and_leaves_state_untouched(tmp_path: Path) -> None:
    # Prepare
    _, ctx, instruction = _setup(tmp_path)
    train(_message(instruction), ctx)
    saved = {k: a.data for k, a in ctx.state.array_records[STATE_RESIDUAL].items()}
    good = instruction.encode()
    assert instruction.downlink == () and len(good) == 34  # round 1: a header alone
    bad = {
        "expected": RecordDict({"e3sfc.config": ConfigRecord({"server-round": 2})}),  # old layout
        "shorter": message_content(good[:-3]),
        "starts with": message_content(b"E3R" + good[3:]),  # a reply's magic
        "cut off": message_content(good[:32] + b"\x01\x00"),  # announces a payload, has none
        "trailing": message_content(good + b"\x00"),
    }
    # Execute / Assert: each is refused with its reason, the state stays as it was
    for reason, content in bad.items():
        with pytest.raises(PayloadError, match=reason):
            train(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), ctx)
    assert {k: a.data for k, a in ctx.state.array_records[STATE_RESIDUAL].items()} == saved


def test_wrong_target_digest_answers_desync(tmp_path: Path) -> None:
    # Prepare
    _, ctx, instruction = _setup(tmp_path)
    wrong = Instruction(1, 1, b"\x00" * 8, instruction.max_uplink_bytes, -1, ())
    # Execute
    reply = reply_from(train(_message(wrong), ctx))
    # Assert
    assert reply.status == "desync" and reply.payload == b""


def test_state_dir_survives_a_supernode_restart(tmp_path: Path) -> None:
    # Prepare
    node_config = {"partition-id": 0, "num-partitions": 4, "state-dir": str(tmp_path / "state")}
    _, ctx, instruction = _setup(tmp_path, node_config)
    train(_message(instruction), ctx)
    residual = ctx.state.array_records[STATE_RESIDUAL]["residual"].numpy()
    # Execute: a new Context (the SuperNode restarted and lost its in-memory state)
    fresh = Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=ctx.run_config
    )
    from client_app.app import _load_state

    state = _load_state(fresh, tmp_path / "state" / "client-0.npz")
    # Assert
    assert state.residual is not None
    assert (state.residual.numpy() == residual).all()


def test_query_answers_the_partition_of_the_node_config_and_refuses_other_queries(tmp_path: Path) -> None:
    # Prepare
    from client_app.app import query
    from e3sfc_flower.records import partition_from, query_content

    _, ctx, _ = _setup(tmp_path, {"partition-id": "3", "num-partitions": "4"})  # strings, as a CLI gives
    other = Message(RecordDict({"e3sfc.query": ConfigRecord({"ask": "weights"})}), 7, MessageType.QUERY)
    # Execute
    answer = partition_from(
        query(Message(query_content(), dst_node_id=7, message_type=MessageType.QUERY), ctx)
    )
    # Assert
    assert (answer.partition_id, answer.num_partitions) == (3, 4)
    with pytest.raises(PayloadError, match="not an e3sfc partition query"):
        query(other, ctx)
