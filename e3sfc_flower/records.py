"""Flower record <-> plain data conversions shared by both apps (no math here), and the
names of every record the apps exchange or keep: the one place for them.

Payload bytes travel as raw ``uint8`` Arrays (so Flower chunks big ones, e.g. full-weight
re-syncs) and are read back with our own tag checked; nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from e3sfc_core.errors import PayloadError
from e3sfc_core.protocol import STATUS_ERROR, Instruction, PartitionAnswer, Reply

RAW_STYPE = "e3sfc/raw-bytes"
RECORD_UPLINK = "e3sfc.uplink"
RECORD_DOWNLINK = "e3sfc.downlink"
RECORD_CONFIG = "e3sfc.config"
RECORD_METRICS = "metrics"
STATE_RESIDUAL = "e3sfc.residual"  # the client's state in ``context.state``
REPLY_FIELDS = "e3sfc.reply"
RECORD_QUERY = "e3sfc.query"
RECORD_PARTITION = "e3sfc.partition"
ASK_PARTITION = "partition"


def bytes_record(blobs: Sequence[bytes]) -> ArrayRecord:
    """Ordered payloads as raw-byte Arrays keyed "0", "1", ..."""
    return ArrayRecord(
        {
            str(i): Array(dtype="uint8", shape=(len(b),), stype=RAW_STYPE, data=bytes(b))
            for i, b in enumerate(blobs)
        }
    )


def record_bytes(record: ArrayRecord) -> list[bytes]:
    """Inverse of :func:`bytes_record`; refuses anything that is not our raw bytes."""
    out = []
    for i in range(len(record)):
        arr = record.get(str(i))
        if arr is None or arr.stype != RAW_STYPE or arr.dtype != "uint8":
            raise PayloadError(f"record entry {i} is missing or not raw payload bytes")
        out.append(bytes(arr.data))
    return out


def instruction_content(instruction: Instruction) -> RecordDict:
    """Server -> client train message."""
    return RecordDict(
        {
            RECORD_CONFIG: ConfigRecord(dict(instruction.fields())),
            RECORD_DOWNLINK: bytes_record(instruction.downlink),
        }
    )


def instruction_from(msg: Message) -> Instruction:
    """Validate a train message from the server."""
    content = msg.content
    if RECORD_CONFIG not in content.config_records or RECORD_DOWNLINK not in content.array_records:
        raise PayloadError("train message lacks the e3sfc config or downlink record")
    return Instruction.from_fields(
        content.config_records[RECORD_CONFIG], record_bytes(content.array_records[RECORD_DOWNLINK])
    )


def reply_content(reply: Reply) -> RecordDict:
    """Client -> server reply."""
    metrics: dict[str, int | float | list[int] | list[float]] = dict(reply.metrics)
    metrics["num-examples"] = reply.num_examples
    return RecordDict(
        {
            RECORD_UPLINK: bytes_record([reply.payload]),
            REPLY_FIELDS: ConfigRecord(dict(reply.fields())),
            RECORD_METRICS: MetricRecord(metrics),
        }
    )


def reply_from(msg: Message) -> Reply:
    """Turn any reply message (good, Flower error, or garbage) into a :class:`Reply`."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return Reply(node, STATUS_ERROR, error=f"client error: {msg.error.reason}")
    content = msg.content
    try:
        blobs = record_bytes(content.array_records[RECORD_UPLINK])
        fields = content.config_records[REPLY_FIELDS]
        metrics = content.metric_records.get(RECORD_METRICS, MetricRecord())
    except (KeyError, PayloadError) as exc:
        return Reply(node, STATUS_ERROR, error=f"malformed reply: {exc}")
    if len(blobs) != 1:
        return Reply(
            node, STATUS_ERROR, b"".join(blobs), error=f"reply carries {len(blobs)} payloads, expected 1"
        )
    return Reply.from_fields(node, fields, blobs[0], metrics)


def query_content() -> RecordDict:
    """Server -> client query: which partition do you train on?"""
    return RecordDict({RECORD_QUERY: ConfigRecord({"ask": ASK_PARTITION})})


def check_query(msg: Message) -> None:
    """Client side: refuse any query but ours."""
    record = msg.content.config_records.get(RECORD_QUERY)
    if record is None or record.get("ask") != ASK_PARTITION:
        raise PayloadError("query message is not an e3sfc partition query")


def partition_content(answer: PartitionAnswer) -> RecordDict:
    """Client -> server answer to :func:`query_content`."""
    return RecordDict({RECORD_PARTITION: ConfigRecord(dict(answer.fields()))})


def partition_from(msg: Message) -> PartitionAnswer:
    """Validate a node's answer; a Flower error or a malformed answer raises ``PayloadError``."""
    if msg.has_error():
        raise PayloadError(f"client error: {msg.error.reason}")
    record = msg.content.config_records.get(RECORD_PARTITION)
    if record is None:
        raise PayloadError("answer lacks the e3sfc partition record")
    return PartitionAnswer.from_fields(record)
