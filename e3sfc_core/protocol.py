"""The round messages between server and client as plain data (no framework types).

The Flower apps only copy these fields into and out of records; the plain-Python loop
passes them directly. ``Instruction.from_fields`` and ``Reply.from_fields`` validate what
arrived from the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PayloadError
from .tensors import DIGEST_SIZE

STATUS_OK = "ok"
STATUS_DESYNC = "desync"
STATUS_ERROR = "error"
REPLY_METRICS = (
    "cosine",
    "residual-ratio",
    "update-residual-ratio",
    "compress-seconds",
    "train-seconds",
    "train-loss",
)


@dataclass(frozen=True)
class Instruction:
    """What the server sends a sampled client at the start of a round."""

    server_round: int
    n_samples: int
    target_digest: bytes
    max_uplink_bytes: int
    accepted_round: int  # last round whose uplink from this node the server applied (-1: none)
    downlink: tuple[bytes, ...] = ()
    applied_scale: float = 1.0  # share of that uplink the server applied (< 1: norm-clipped)

    def fields(self) -> dict[str, int | float | bytes]:
        """Scalar fields (the downlink payloads travel separately)."""
        return {
            "server-round": self.server_round,
            "n-samples": self.n_samples,
            "target-digest": self.target_digest,
            "max-uplink-bytes": self.max_uplink_bytes,
            "accepted-round": self.accepted_round,
            "applied-scale": self.applied_scale,
        }

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], downlink: Sequence[bytes]) -> Instruction:
        """Validate fields received from the server."""
        try:
            digest = f["target-digest"]
            ints = {k: f[k] for k in ("server-round", "n-samples", "max-uplink-bytes", "accepted-round")}
        except KeyError as exc:
            raise PayloadError(f"instruction lacks field {exc}") from None
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise PayloadError("instruction target-digest must be 8 bytes")
        for k, v in ints.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < (-1 if k == "accepted-round" else 0):
                raise PayloadError(f"instruction field {k} must be a non-negative integer, got {v!r}")
        scale = f.get("applied-scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0.0 <= scale <= 1.0:
            raise PayloadError(f"instruction field applied-scale must be a number in [0, 1], got {scale!r}")
        return cls(
            server_round=ints["server-round"],
            n_samples=max(1, ints["n-samples"]),
            target_digest=digest,
            max_uplink_bytes=ints["max-uplink-bytes"],
            accepted_round=ints["accepted-round"],
            applied_scale=float(scale),
            downlink=tuple(bytes(d) for d in downlink),
        )


@dataclass(frozen=True)
class Reply:
    """What a client sends back (or what the glue builds for a failed client)."""

    node_id: int
    status: str = STATUS_OK
    payload: bytes = b""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    partition_id: int = -1  # lets the server aggregate in a fixed order (node IDs are random)

    def fields(self) -> dict[str, int | str]:
        """Scalar fields besides the payload and metrics."""
        return {"status": self.status, "num-examples": self.num_examples, "partition-id": self.partition_id}

    @classmethod
    def from_fields(
        cls, node_id: int, f: Mapping[str, Any], payload: bytes, metrics: Mapping[str, Any]
    ) -> Reply:
        """Validate a client's reply; anything odd becomes an error reply with the reason."""
        status = f.get("status")
        n = f.get("num-examples")
        if status not in (STATUS_OK, STATUS_DESYNC):
            return cls(node_id, STATUS_ERROR, payload, error=f"unknown reply status {status!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return cls(node_id, STATUS_ERROR, payload, error=f"num-examples must be an int >= 0, got {n!r}")
        pid = f.get("partition-id", -1)
        if not isinstance(pid, int) or isinstance(pid, bool):
            pid = -1
        clean = {
            k: float(v)
            for k, v in metrics.items()
            if k in REPLY_METRICS and isinstance(v, (int, float)) and math.isfinite(v)
        }
        return cls(node_id, status, payload, n, clean, partition_id=pid)


@dataclass(frozen=True)
class PartitionAnswer:
    """A node's answer to the server's one-time partition query: which data partition it
    trains on. The server samples partitions, not node IDs (random per Flower run), so
    the same seed trains the same clients in every run and runtime."""

    partition_id: int
    num_partitions: int

    def fields(self) -> dict[str, int]:
        """Scalar fields of the answer."""
        return {"partition-id": self.partition_id, "num-partitions": self.num_partitions}

    @classmethod
    def from_fields(cls, f: Mapping[str, Any]) -> PartitionAnswer:
        """Validate the types of an answer that arrived (the range is checked by the roster)."""
        values: list[int] = []
        for k in ("partition-id", "num-partitions"):
            v = f.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise PayloadError(f"partition answer field {k} must be an integer, got {v!r}")
            values.append(v)
        return cls(partition_id=values[0], num_partitions=values[1])
