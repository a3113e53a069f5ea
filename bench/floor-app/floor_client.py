"""The floor app's ClientApp: answer every train message with ``payload-bytes`` random bytes
(random, so that Flower's content-addressed object store cannot deduplicate them), after
``client-seconds`` of sleep standing in for a client's work."""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    size = int(context.run_config["payload-bytes"])
    time.sleep(float(context.run_config["client-seconds"]))
    content = RecordDict({"m": ConfigRecord({"m": os.urandom(size)})}) if size else RecordDict()
    return Message(content, reply_to=msg)
