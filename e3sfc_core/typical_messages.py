"""A round's two messages at a config's sizes, encoded: what a transport carries in a
typical round, for measuring what it adds on top (the Flower record layout's tests and
``bench/flower_framing.py``). Nothing in a run uses this."""

from __future__ import annotations

from .config import ExperimentConfig
from .datasets import get_spec
from .protocol import Instruction, Reply
from .server import FederatedServer
from .training import resolve_device


def typical_messages(cfg: ExperimentConfig) -> tuple[bytes, bytes]:
    """A round-2 train instruction carrying one compressed downlink payload, and a reply
    with one uplink payload, each payload as large as ``cfg``'s bound (n = its
    ``synthetic-samples``); payload contents are zeros, sizes are exact."""
    server = FederatedServer(cfg, get_spec(cfg.dataset), resolve_device("cpu"))
    first = server.plan_round(1, [0])[0]
    payload = bytes(server.payload_size(cfg.synthetic_samples))
    instruction = Instruction(2, 2, first.target_digest, len(payload), 1, (payload,))
    reply = Reply(0, payload=payload, num_examples=143, metrics={"cosine": 0.5}, partition_id=0)
    return instruction.encode(), reply.encode()
