"""Flower record <-> plain data conversions shared by both apps (no math here), and the
names of every record the apps exchange or keep: the one place for them.

A train message and its reply are each one byte string in our own validated format
(``e3sfc_core.protocol``), carried by one record: a ConfigRecord holding the bytes when
they fit in one of Flower's array chunks (2 Flower objects per message), else a raw
``uint8`` Array that Flower chunks (full-weight re-syncs, FedAvg on big models). Nothing
is pickled; what arrives is checked by our decoder.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from e3sfc_core.errors import PayloadError
from e3sfc_core.protocol import STATUS_ERROR, Instruction, PartitionAnswer, Reply

RAW_STYPE = "e3sfc/raw-bytes"
RECORD_MESSAGE = "e3sfc"  # the one record of a train message or its reply
MESSAGE_KEY = "m"
INLINE_LIMIT = 4 * 2**20  # under Flower's 5 MiB array chunk: inline in a ConfigRecord
STATE_RESIDUAL = "e3sfc.residual"  # the client's state in ``context.state``
RECORD_QUERY = "e3sfc.query"
RECORD_PARTITION = "e3sfc.partition"
ASK_PARTITION = "partition"


def message_content(data: bytes) -> RecordDict:
    """One encoded message as the content of a Flower message."""
    if len(data) <= INLINE_LIMIT:
        return RecordDict({RECORD_MESSAGE: ConfigRecord({MESSAGE_KEY: data})})
    raw = Array(dtype="uint8", shape=(len(data),), stype=RAW_STYPE, data=bytes(data))
    return RecordDict({RECORD_MESSAGE: ArrayRecord({MESSAGE_KEY: raw})})


def content_bytes(content: RecordDict) -> bytes:
    """Inverse of :func:`message_content`; refuses content with anything else in it."""
    if list(content.keys()) != [RECORD_MESSAGE]:
        raise PayloadError(f"message holds records {sorted(content.keys())}, expected [{RECORD_MESSAGE!r}]")
    record = content[RECORD_MESSAGE]
    if isinstance(record, ConfigRecord) and list(record.keys()) == [MESSAGE_KEY]:
        data = record[MESSAGE_KEY]
        if isinstance(data, bytes):
            return data
    if isinstance(record, ArrayRecord) and list(record.keys()) == [MESSAGE_KEY]:
        arr = record[MESSAGE_KEY]
        if arr.stype == RAW_STYPE and arr.dtype == "uint8":
            return bytes(arr.data)
    raise PayloadError(f"record {RECORD_MESSAGE!r} does not hold our message bytes")


def instruction_content(instruction: Instruction) -> RecordDict:
    """Server -> client train message."""
    return message_content(instruction.encode())


def instruction_from(msg: Message) -> Instruction:
    """Validate a train message from the server (``PayloadError`` naming the problem)."""
    return Instruction.decode(content_bytes(msg.content))


def reply_content(reply: Reply) -> RecordDict:
    """Client -> server reply."""
    return message_content(reply.encode())


def reply_from(msg: Message) -> Reply:
    """Turn any reply message (good, Flower error, or garbage) into a :class:`Reply`."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return Reply(node, STATUS_ERROR, error=f"client error: {msg.error.reason}")
    try:
        data = content_bytes(msg.content)
    except PayloadError as exc:
        return Reply(node, STATUS_ERROR, error=f"malformed reply: {exc}")
    return Reply.decode(node, data)


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
