"""The round messages between server and client: plain data and their compact encoding.

A train message and its reply each cross the network as one byte string in this format
(little-endian), which the Flower apps put in a single record and the in-process loop
round-trips too, so both runtimes see the same values (float32 metrics and scale
included). Its ``len()`` is what a message costs on top of Flower's framing: 34 bytes and
4 per payload for an instruction, 41 for a reply, instead of the 40-70 bytes of named
fields in separate Flower records before. :meth:`Instruction.decode` and
:meth:`Reply.decode` validate every field of what arrived.

Instruction: ``"E3I" u8 version | u32 round | u32 n_samples | u32 max_uplink_bytes |
i32 accepted_round | f32 applied_scale | 8 B target digest | u16 count | count x (u32
length, payload)``. Reply: ``"E3R" u8 version | u8 status | u32 num_examples | i32
partition_id | 6 x f32 metrics (``REPLY_METRICS``; NaN: not reported) | u32 length | payload``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PayloadError
from .tensors import DIGEST_SIZE

STATUS_OK = "ok"
STATUS_DESYNC = "desync"
STATUS_ERROR = "error"  # never sent: what the server records for a failed or malformed reply
REPLY_METRICS = (
    "cosine",
    "residual-ratio",
    "update-residual-ratio",
    "compress-seconds",
    "train-seconds",
    "train-loss",
)
MESSAGE_VERSION = 1
_INSTRUCTION = struct.Struct(f"<3sBIIIif{DIGEST_SIZE}sH")
_REPLY = struct.Struct(f"<3sBBIi{len(REPLY_METRICS)}fI")
_LENGTH = struct.Struct("<I")
_WIRE_STATUS = (STATUS_OK, STATUS_DESYNC)


def instruction_size(payload_lengths: list[int]) -> int:
    """Exact ``len()`` of an encoded instruction carrying payloads of these lengths."""
    return _INSTRUCTION.size + sum(_LENGTH.size + n for n in payload_lengths)


def reply_size(payload_length: int) -> int:
    """Exact ``len()`` of an encoded reply carrying a payload of this length."""
    return _REPLY.size + payload_length


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

    def encode(self) -> bytes:
        """The message as it crosses the network."""
        head = _INSTRUCTION.pack(
            b"E3I",
            MESSAGE_VERSION,
            self.server_round,
            self.n_samples,
            self.max_uplink_bytes,
            self.accepted_round,
            self.applied_scale,
            self.target_digest,
            len(self.downlink),
        )
        return head + b"".join(_LENGTH.pack(len(p)) + p for p in self.downlink)

    @classmethod
    def decode(cls, data: bytes) -> Instruction:
        """Validate an instruction that arrived; :class:`PayloadError` names what is wrong."""
        rnd, n, max_up, accepted, scale, digest, count = _head("instruction", data, _INSTRUCTION, b"E3I")
        if n < 1:
            raise PayloadError(f"instruction n_samples must be >= 1, got {n}")
        if accepted < -1:
            raise PayloadError(f"instruction accepted_round must be >= -1, got {accepted}")
        if not 0.0 <= scale <= 1.0:  # NaN fails too
            raise PayloadError(f"instruction applied_scale must be in [0, 1], got {scale!r}")
        downlink, at = [], _INSTRUCTION.size
        for i in range(count):
            payload, at = _take(data, at, f"instruction downlink payload {i}")
            downlink.append(payload)
        if at != len(data):
            raise PayloadError(f"instruction has {len(data) - at} trailing bytes")
        return cls(rnd, n, digest, max_up, accepted, tuple(downlink), scale)


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
    size: int = 0  # bytes the reply took on the network (0: nothing arrived)

    def encode(self) -> bytes:
        """The reply as it crosses the network (an error reply is never sent)."""
        if self.status not in _WIRE_STATUS:
            raise PayloadError(f"a {self.status!r} reply is not sent")
        metrics = [self.metrics.get(k, math.nan) for k in REPLY_METRICS]
        head = _REPLY.pack(
            b"E3R",
            MESSAGE_VERSION,
            _WIRE_STATUS.index(self.status),
            self.num_examples,
            self.partition_id,
            *metrics,
            len(self.payload),
        )
        return head + self.payload

    @classmethod
    def decode(cls, node_id: int, data: bytes) -> Reply:
        """Validate a reply that arrived; anything wrong becomes an error reply naming it
        (the server counts it as a drop and goes on)."""
        try:
            status, n, pid, *metrics, _ = _head("reply", data, _REPLY, b"E3R")
            if status >= len(_WIRE_STATUS):
                raise PayloadError(f"unknown reply status {status}")
            payload, at = _take(data, _REPLY.size - _LENGTH.size, "reply payload")
            if at != len(data):
                raise PayloadError(f"reply has {len(data) - at} trailing bytes")
        except PayloadError as exc:
            return cls(node_id, STATUS_ERROR, error=f"malformed reply: {exc}", size=len(data))
        clean = {k: v for k, v in zip(REPLY_METRICS, metrics, strict=True) if math.isfinite(v)}
        return cls(node_id, _WIRE_STATUS[status], payload, n, clean, partition_id=pid, size=len(data))


def _head(what: str, data: bytes, layout: struct.Struct, magic: bytes) -> tuple[Any, ...]:
    """The header fields after magic and version, once both are checked."""
    if len(data) < layout.size:
        raise PayloadError(f"{what} of {len(data)} bytes is shorter than its {layout.size}-byte header")
    found, version, *fields = layout.unpack_from(data)
    if found != magic:
        raise PayloadError(f"{what} starts with {found!r}, not {magic!r}")
    if version != MESSAGE_VERSION:
        raise PayloadError(f"{what} format version {version} is not {MESSAGE_VERSION}")
    return tuple(fields)


def _take(data: bytes, at: int, what: str) -> tuple[bytes, int]:
    """A u32-length-prefixed byte string at ``at``, and the offset after it."""
    if at + _LENGTH.size > len(data):
        raise PayloadError(f"{what}: length field cut off")
    (n,) = _LENGTH.unpack_from(data, at)
    at += _LENGTH.size
    if at + n > len(data):
        raise PayloadError(f"{what}: {n} bytes announced, {len(data) - at} present")
    return bytes(data[at : at + n]), at + n


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
