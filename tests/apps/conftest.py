"""Fixtures that run the real ServerApp strategy and ClientApp handler in one process.

``FakeGrid`` implements the part of Flower's Grid our strategy uses and answers each
train message by calling the real ClientApp ``train`` handler with a per-node Context,
so app tests exercise the same records, validation and state handling as a deployment.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import train as client_train
from e3sfc_core.config import ExperimentConfig

Tamper = Callable[[int, Message], Message]


@pytest.fixture(autouse=True)
def _task_identity() -> Iterable[None]:
    """Messages can only be built inside a task; pretend we are one."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


class FakeGrid:
    """In-process grid: node i holds partition i; replies can be tampered with."""

    def __init__(self, cfg: ExperimentConfig, num_nodes: int, tamper: Tamper | None = None) -> None:
        self.node_ids = [1000 + i for i in range(num_nodes)]
        run_config = cfg.to_run_config()
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.tamper = tamper
        self.outbox: dict[str, Message] = {}
        self.sent: list[Message] = []
        self._ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                reply = client_train(msg, self.contexts[node])
            except Exception as exc:  # what Flower does with a raising ClientApp
                from flwr.app import Error

                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            finally:
                TaskIdentity.node_id = 0
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            if reply is not None:
                self.outbox[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.outbox.pop(m) for m in list(message_ids) if m in self.outbox]
