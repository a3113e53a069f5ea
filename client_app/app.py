"""ClientApp: say which partition this node trains on; load state and data, run one
core client round, store state last."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from e3sfc_core.client import (
    ClientState,
    client_data,
    client_round,
    client_state_file,
    load_client_state,
    save_client_state,
)
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.datasets import get_spec
from e3sfc_core.partition_cache import default_cache_dir
from e3sfc_core.protocol import PartitionAnswer
from e3sfc_core.training import resolve_device
from e3sfc_flower.records import (
    STATE_RESIDUAL,
    check_query,
    instruction_from,
    partition_content,
    reply_content,
)

app = ClientApp()


def _load_state(context: Context, state_file: Path | None) -> ClientState:
    """From the node's in-memory state, else from its state directory, else empty."""
    if STATE_RESIDUAL in context.state.array_records:
        record = context.state.array_records[STATE_RESIDUAL]
        return ClientState.from_tensors({k: a.numpy() for k, a in record.items()})
    return load_client_state(state_file) if state_file is not None else ClientState()


def _partition(context: Context, cfg: ExperimentConfig) -> PartitionAnswer:
    """This node's partition from its node-config (what it trains on and reports)."""
    node = context.node_config
    return PartitionAnswer(
        partition_id=int(node.get("partition-id", 0)),
        num_partitions=int(node.get("num-partitions", cfg.num_partitions)),
    )


def _cache_dir(context: Context) -> Path | None:
    """Where this node caches its partition: node-config ``partition-cache`` (empty: no
    cache), else the user's cache folder. Each message is a fresh process in a deployment."""
    where = context.node_config.get("partition-cache")
    if where is None:
        return default_cache_dir()
    return Path(str(where)).expanduser() if str(where) else None


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node trains on (it samples partitions)."""
    check_query(msg)
    cfg = ExperimentConfig.from_run_config(context.run_config)
    return Message(content=partition_content(_partition(context, cfg)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One E-3SFC client round. Exceptions propagate: Flower reports them to the server."""
    cfg = ExperimentConfig.from_run_config(context.run_config)
    node = context.node_config
    part = _partition(context, cfg)
    partition_id, num_partitions = part.partition_id, part.num_partitions
    data_root = str(node.get("data-root", cfg.data_root))
    state_dir = node.get("state-dir")
    state_file = client_state_file(str(state_dir), partition_id) if state_dir else None
    instruction = instruction_from(msg)
    spec = get_spec(cfg.dataset)
    data = client_data(cfg, partition_id, num_partitions, data_root, _cache_dir(context))
    reply, new_state = client_round(
        cfg,
        spec,
        instruction,
        data,
        _load_state(context, state_file),
        node_id=int(context.node_id),
        partition_id=partition_id,
        device=resolve_device(cfg.device),
    )
    if state_file is not None:
        save_client_state(state_file, new_state)
    tensors = new_state.to_tensors()
    # State is written last: a failure above leaves the previous state untouched.
    context.state[STATE_RESIDUAL] = ArrayRecord({k: Array(v.numpy()) for k, v in tensors.items()})
    return Message(content=reply_content(reply), reply_to=msg)
