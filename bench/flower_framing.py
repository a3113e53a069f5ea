"""What Flower's own per-run traffic accounting charges for one message, and how much of it
an application can change (issue 13's framing goal).

Command (seconds, no network)::

    .venv/bin/python bench/flower_framing.py

The SuperLink's Fleet handlers (flwr 1.42, ``superlink/servicer/fleet/fleet_handlers.py``)
add to a run's ``network-traffic``: the protobuf size of the ``PullMessages`` request and
response that delivered a message (its metadata and object tree), of the ``PushMessages``
request and response that delivered a reply, and the bytes of every object pulled or
pushed (the ``Message`` object itself, with its metadata again, the ``RecordDict`` and
each record). This script builds those very protobufs with Flower's own serialisation
for a default E-3SFC round-2 train message and its reply, next to the same messages with
empty content, and splits the count. The deployed measurement of the same accounting is
``results/deployment_compare.md`` ("Flower framing").
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from flwr.app import Message, Metadata, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import (  # type: ignore[attr-defined]
    PullMessagesRequest,
    PullMessagesResponse,
    PushMessagesRequest,
    PushMessagesResponse,
    Reconnect,
)
from flwr.proto.node_pb2 import Node  # type: ignore[attr-defined]
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from bench.report import Report, Table, env_info, run_script
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.typical_messages import typical_messages
from e3sfc_flower.records import message_content

SUPERLINK_NODE = 1  # Flower's node id for the SuperLink side of a message


def flower_pair(content: RecordDict, reply_content: RecordDict, seed: int) -> tuple[Message, Message]:
    """A train message as the SuperLink stores it (ids as Flower draws them) and its reply."""
    rng = random.Random(seed)
    node, run = rng.getrandbits(63), rng.getrandbits(63)
    meta = Metadata(run, "", SUPERLINK_NODE, node, "", "2", 1.7e9 + rng.random(), 3600.0, "train")
    msg = Message(metadata=meta, content=content)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg, Message(reply_content, reply_to=msg)


def accounting(msg: Message, direction: str) -> dict[str, int]:
    """Bytes Flower's Fleet handlers count for delivering ``msg`` (a SuperNode pulling a
    train message, or pushing a reply), by part."""
    node = Node(node_id=msg.metadata.dst_node_id if direction == "down" else msg.metadata.src_node_id)
    tree = get_object_tree(msg)
    objects = get_all_nested_objects(msg)
    bare = message_to_proto(remove_content_from_message(msg))
    if direction == "down":
        request = PullMessagesRequest(node=node).ByteSize()
        response = PullMessagesResponse(messages_list=[bare], message_object_trees=[tree]).ByteSize()
    else:
        request = PushMessagesRequest(
            node=node, messages_list=[bare], message_object_trees=[tree], clientapp_runtime_list=[1.5]
        ).ByteSize()
        response = PushMessagesResponse(
            reconnect=Reconnect(reconnect=5),
            results={msg.metadata.message_id: 0},
            objects_to_push=list(objects),
            session_id="0" * 36,  # a uuid4 string
        ).ByteSize()
    return {
        "request_response": request + response,
        "metadata_in_request": bare.metadata.ByteSize(),
        "objects": len(objects),
        "object_bytes": sum(len(o.deflate()) for o in objects.values()),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="draws the node and run ids")
    p.add_argument("--out-name", default="flower_framing")
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    ours = typical_messages(ExperimentConfig.from_run_config({"device": "cpu"}))
    rows = []
    for label, down, up in (("empty content", b"", b""), ("E-3SFC default", *ours)):
        msg, reply = flower_pair(*(message_content(d) if d else RecordDict() for d in (down, up)), args.seed)
        for direction, one, data in (("down", msg, down), ("up", reply, up)):
            parts = accounting(one, direction)
            rows.append({"content": label, "direction": direction, "ours": len(data), **parts})
    return {"env": env_info("cpu"), "args": vars(args), "rows": rows}


def render(data: dict[str, Any]) -> Report:
    table = []
    for r in data["rows"]:
        total = r["request_response"] + r["object_bytes"]
        table.append(
            [
                r["content"],
                "train message (pulled)" if r["direction"] == "down" else "reply (pushed)",
                f"{r['ours']:,}",
                r["objects"],
                f"{r['object_bytes'] - r['ours']:,}",
                f"{r['request_response']:,} ({r['metadata_in_request']:,})",
                f"{total:,}",
                f"**{total - r['ours']:,}**",
            ]
        )
    headers = [
        "content",
        "message",
        "our bytes",
        "Flower objects",
        "object bytes beyond ours",
        "Pull/Push request + response (of it, the metadata)",
        "Flower's count",
        "framing (count - ours)",
    ]
    return Report(
        "Flower's per-run accounting of one message: the floor and ours",
        intro=[
            "Each row rebuilds, with Flower's own serialisation, what the SuperLink's Fleet "
            "handlers add to the run's `network-traffic` for one message: the Pull/Push "
            "request and response that carry its metadata and object tree, plus the "
            "deflated objects (the `Message` object repeats the metadata). *Empty content* "
            "is the least any application can send through Flower's Message API; "
            "*E-3SFC default* is a round-2 train message (the compressed downlink) and a "
            "reply at the default settings (digits, MLP, n = 4), as `e3sfc_flower.records` "
            "carries them (one ConfigRecord holding our bytes)."
        ],
        body=[Table(headers, table), conclusion(data["rows"])],
    )


def conclusion(rows: list[dict[str, Any]]) -> str:
    """What the rows say about a 600 B framing goal per message."""
    framing = {
        (r["content"], r["direction"]): r["request_response"] + r["object_bytes"] - r["ours"] for r in rows
    }
    floor_down, floor_up = framing["empty content", "down"], framing["empty content", "up"]
    ours_down, ours_up = framing["E-3SFC default", "down"], framing["E-3SFC default", "up"]
    return (
        f"An empty reply already costs {floor_up:,} B of Flower framing and an empty train "
        f"message {floor_down:,} B ({(floor_up + floor_down) / 2:,.0f} B per message on "
        "average): message ids and object ids are 64 hex characters each and appear in the "
        "tree, the parent object's header and the push response, and the metadata travels "
        "twice. Carrying any bytes at all takes one record more (a third object); ours adds "
        f"{ours_down - floor_down:,} B to the train message and {ours_up - floor_up:,} B to the "
        "reply over that floor. So no application can bring a reply under 600 B of framing "
        "through Flower 1.42's Message API. The deployed measurement splits Flower's count "
        "by direction of traffic (inbound / outbound at the SuperLink) rather than by "
        "message, so it charges the push responses to the downlink and includes the run's "
        "partition queries."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("flower_framing.py", parser(), measure, render, argv)


if __name__ == "__main__":
    main()
