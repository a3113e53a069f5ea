"""Fixtures that run the real ServerApp strategy and ClientApp handler in one process.

``FakeGrid`` implements the part of Flower's Grid our strategy uses and answers each
train (query) message by calling the real ClientApp ``train`` (``query``) handler with a
per-node Context, so app tests exercise the same records, validation and state handling
as a deployment. Node IDs can be given (Flower draws them at random per run).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence

import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import query as client_query
from client_app.app import train as client_train
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.protocol import Reply
from e3sfc_flower.records import content_bytes, message_content

Tamper = Callable[[int, Message], Message]


@pytest.fixture(autouse=True)
def _task_identity() -> Iterable[None]:
    """Messages can only be built inside a task; pretend we are one."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


def with_payload(reply: Message, payload: bytes) -> Message:
    """``reply`` (a good reply message) carrying ``payload`` instead of its own."""
    sent = Reply.decode(0, content_bytes(reply.content))
    reply.content = message_content(dataclasses.replace(sent, payload=payload).encode())
    return reply


def with_bytes(reply: Message, data: bytes) -> Message:
    """``reply`` whose whole message is ``data`` (garbage, truncated, ...)."""
    reply.content = message_content(data)
    return reply


class FakeGrid:
    """In-process grid: the i-th node (ID ``node_ids[i]``, default 1000 + i) holds
    partition i; train replies can be tampered with (``tamper``), query answers too
    (``query_tamper``). Train messages are logged in ``sent``, queries in ``queries``."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        num_nodes: int,
        tamper: Tamper | None = None,
        node_ids: Sequence[int] | None = None,
    ) -> None:
        self.run_config = cfg.to_run_config()
        self.num_partitions = num_nodes
        self.node_ids: list[int] = []
        self.contexts: dict[int, Context] = {}
        self.partition_of: dict[int, int] = {}  # every node ever connected -> its partition
        for i, nid in enumerate(node_ids or [1000 + i for i in range(num_nodes)]):
            self.add_node(nid, i)
        self.tamper = tamper
        self.query_tamper: Tamper | None = None
        self.outbox: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.queries: list[Message] = []
        self._ids = itertools.count()

    def add_node(self, node_id: int, partition_id: int, **node_config: int | str) -> None:
        """Connect a node serving ``partition_id`` (node-config entries may be overridden)."""
        config = {"partition-id": partition_id, "num-partitions": self.num_partitions, **node_config}
        self.node_ids.append(node_id)
        self.partition_of[node_id] = partition_id
        self.contexts[node_id] = Context(
            run_id=1, node_id=node_id, node_config=config, state=RecordDict(), run_config=self.run_config
        )

    def remove_node(self, node_id: int) -> None:
        """Disconnect a node (its state is gone, as with a killed SuperNode)."""
        self.node_ids.remove(node_id)
        del self.contexts[node_id]

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            is_query = msg.metadata.message_type == MessageType.QUERY
            (self.queries if is_query else self.sent).append(msg)
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                handler = client_query if is_query else client_train
                reply = handler(msg, self.contexts[node])
            except Exception as exc:  # what Flower does with a raising ClientApp
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            finally:
                TaskIdentity.node_id = 0
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            tamper = self.query_tamper if is_query else self.tamper
            if tamper is not None:
                reply = tamper(node, reply)
            if reply is not None:
                self.outbox[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.outbox.pop(m) for m in list(message_ids) if m in self.outbox]
