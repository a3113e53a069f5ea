"""The floor app's ClientApp: answer every train message with as many random bytes (random,
so that Flower's content-addressed object store cannot deduplicate them)."""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    size = int(context.run_config["payload-bytes"])
    content = RecordDict({"m": ConfigRecord({"m": os.urandom(size)})}) if size else RecordDict()
    return Message(content, reply_to=msg)
