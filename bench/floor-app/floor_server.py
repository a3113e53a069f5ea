"""The floor app's ServerApp: each round, one train message to every node, wait for all
replies, print a ``round N |`` line (the line ``bench/deployment_bench.py`` times)."""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
POLL_SECONDS = 0.2  # as often as our own ServerApp pulls replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, size, wanted = int(cfg["num-rounds"]), int(cfg["payload-bytes"]), int(cfg["min-nodes"])
    nodes: list[int] = []
    while len(nodes) < wanted:
        time.sleep(POLL_SECONDS)
        nodes = sorted(grid.get_node_ids())
    print(f"initial model | nodes {len(nodes)}", flush=True)
    for rnd in range(1, rounds + 1):
        out = [Message(_content(size), node, "train", group_id=str(rnd)) for node in nodes]
        pending = {i for i in grid.push_messages(out) if i}
        while pending:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
            time.sleep(POLL_SECONDS)
        print(f"round {rnd} | {len(nodes)} replies", flush=True)


def _content(size: int) -> RecordDict:
    return RecordDict({"m": ConfigRecord({"m": os.urandom(size)})}) if size else RecordDict()
