"""The message layout through Flower's own serialisation: one record per message, little
framing, large messages still chunked by Flower, and the bytes come back unchanged."""

from __future__ import annotations

import pytest
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from e3sfc_core.config import ExperimentConfig
from e3sfc_core.protocol import Reply, instruction_size, reply_size
from e3sfc_core.typical_messages import typical_messages
from e3sfc_flower.records import INLINE_LIMIT, content_bytes, message_content

FRAMING_GOAL = 600  # bytes of Flower objects per message beyond our own (issue 13)


def _deflated(content) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Flower objects of ``content`` and their deflated bytes (what Flower stores and ships)."""
    objects = get_all_nested_objects(content)
    return len(objects), sum(len(o.deflate()) for o in objects.values())


def _real_messages() -> tuple[bytes, bytes]:
    """Round-2 instruction (with a compressed downlink) and a default-sized reply."""
    return typical_messages(ExperimentConfig.from_run_config({"device": "cpu"}))


def test_a_message_is_two_flower_objects_and_little_framing() -> None:
    # Prepare
    instruction, reply = _real_messages()

    # Execute / Assert: each message is a RecordDict and one ConfigRecord, and what Flower
    # adds to our bytes stays under the goal
    for data in (instruction, reply):
        count, size = _deflated(message_content(data))
        assert count == 2
        assert len(data) < size <= len(data) + FRAMING_GOAL


def test_our_fields_cost_what_the_size_functions_say() -> None:
    instruction, reply = _real_messages()
    payload = len(reply) - reply_size(0)
    assert len(instruction) == instruction_size([payload]) == 34 + 4 + payload
    assert len(reply) == reply_size(payload) == 41 + payload


@pytest.mark.parametrize("size", [10, INLINE_LIMIT, INLINE_LIMIT + 1, 3 * INLINE_LIMIT])
def test_messages_round_trip_through_flower_serialisation(size: int) -> None:
    # Prepare: inline up to the limit, then a raw Array that Flower cuts into chunks
    data = Reply(0, payload=bytes(range(256)) * (size // 256) + bytes(size % 256)).encode()
    content = message_content(data)

    # Execute
    back = recorddict_from_proto(recorddict_to_proto(content))

    # Assert
    assert content_bytes(back) == data
    count, _ = _deflated(content)
    assert count == 2 if len(data) <= INLINE_LIMIT else count > 3
