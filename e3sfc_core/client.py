"""Client side of a round: catch up with the global model, train, compress with error
feedback. Framework-free; the ClientApp only moves :class:`ClientState` in and out of
Flower's node state."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .compressor import Budget, Compressor, CompressorSettings, PayloadMeta, build_compressor
from .config import ExperimentConfig
from .datasets import DatasetSpec, TensorData, load_partition
from .errors import DesyncError, PayloadError
from .models import build_model
from .partition_cache import cached_partition
from .payload import Direction
from .protocol import STATUS_DESYNC, STATUS_OK, Instruction, Reply
from .rounds import apply_downlink, bounded_residual, compress_update
from .seeds import COMPRESSOR, SHUFFLE, derive_seed
from .synthetic_gradient import parameter_sizes
from .tensors import digest_flat, get_flat, num_params, set_flat
from .training import apply_threads, train_local

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientState:
    """What a client keeps between rounds (all optional: a new node has nothing).

    ``weights`` is its copy of the global model (needed to replay compressed downlinks),
    ``residual`` its error-feedback memory, and ``pending`` the update it sent in
    ``pending_round``: if the server reports it did not apply that round's payload,
    the update goes back into the residual instead of being lost. ``previous`` is the
    residual from before ``pending_round``: a server that restarted from a checkpoint
    may ask for that same round again, and the client then redoes it from there (so the
    round is neither lost nor counted twice). A server that norm-clipped the pending
    update says by how much (``Instruction.applied_scale``); the part it did not apply
    goes back into the residual too.
    """

    weights: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    pending: torch.Tensor | None = None
    pending_round: int = -1
    previous: torch.Tensor | None = None

    def residual_for(self, instruction: Instruction, uses_error_feedback: bool) -> torch.Tensor | None:
        """The residual to start this round from (see the class docstring)."""
        if not uses_error_feedback or self.pending_round < 0 or self.pending is None:
            return self.residual
        if instruction.server_round <= self.pending_round:
            return self.previous  # the same round again: forget the uncommitted attempt
        held_back = 1.0 - instruction.applied_scale  # what norm clipping did not apply
        if instruction.accepted_round != self.pending_round:
            logger.info("round %d was not applied; its update returns to the residual", self.pending_round)
            held_back = 1.0
        if held_back <= 0.0:
            return self.residual
        kept = self.pending * held_back
        return kept if self.residual is None else self.residual + kept

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for storage (the round number rides along as a 1-element tensor)."""
        out = {"pending-round": torch.tensor([self.pending_round], dtype=torch.int64)}
        for name in ("weights", "residual", "pending", "previous"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.detach().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any]) -> ClientState:
        """Inverse of :meth:`to_tensors` (accepts tensors or NumPy arrays)."""

        def get(name: str) -> torch.Tensor | None:
            value = tensors.get(name)
            return None if value is None else torch.as_tensor(value).reshape(-1).float()

        pr = tensors.get("pending-round")
        pending_round = int(torch.as_tensor(pr).reshape(-1)[0]) if pr is not None else -1
        return cls(get("weights"), get("residual"), get("pending"), pending_round, get("previous"))

    def fitted(self, numel: int) -> ClientState:
        """Drop entries whose size does not match the model (a changed model, or garbage)."""

        def ok(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is not None and t.numel() == numel else None

        return ClientState(
            ok(self.weights), ok(self.residual), ok(self.pending), self.pending_round, ok(self.previous)
        )


def client_data(
    cfg: ExperimentConfig,
    partition_id: int,
    num_partitions: int,
    data_root: str | Path,
    cache_dir: str | Path | None = None,
) -> TensorData:
    """The training data of one client: partition ``partition_id`` of ``num_partitions``
    under the run's partitioning (seeded, so every process computes the same split),
    through the on-disk cache in ``cache_dir`` when one is given (``partition_cache``)."""
    load = load_partition if cache_dir is None else functools.partial(cached_partition, cache_dir=cache_dir)
    return load(
        cfg.dataset,
        partition_id,
        num_partitions,
        alpha=cfg.partition_alpha,
        seed=cfg.seed,
        data_root=data_root,
        download=cfg.download,
    )


def client_compressor(
    cfg: ExperimentConfig, spec: DatasetSpec, partition_id: int, layer_count: int = 0
) -> Compressor:
    """The method's compressor with a per-client seed, so that clients' random choices
    (3SFC initialisation, QSGD rounding) are independent and their noise averages out."""
    return build_compressor(cfg.compressor_name, client_settings(cfg, partition_id, layer_count), spec)


def client_settings(cfg: ExperimentConfig, partition_id: int, layer_count: int = 0) -> CompressorSettings:
    """``cfg``'s compressor settings with client ``partition_id``'s own seed."""
    seed = derive_seed(cfg.seed, COMPRESSOR, partition_id)
    return replace(cfg.compressor_settings(layer_count), seed=seed)


def client_round(
    cfg: ExperimentConfig,
    spec: DatasetSpec,
    instruction: Instruction,
    data: TensorData,
    state: ClientState,
    *,
    node_id: int,
    partition_id: int,
    device: torch.device,
) -> tuple[Reply, ClientState]:
    """Run one client round and return the reply and the state to keep.

    A client that cannot reach the server's model digest answers ``desync`` (and
    forgets its weights, so the next round starts from a full re-sync).
    """
    apply_threads(cfg.num_threads)
    model = build_model(cfg.model, tuple(spec.input_shape), spec.n_classes, cfg.seed).to(device)
    compressor = client_compressor(cfg, spec, partition_id, len(parameter_sizes(model)))
    model.eval()
    state = state.fitted(num_params(model))
    if state.weights is not None:
        set_flat(model, state.weights.to(device))
    try:
        apply_downlink(model, instruction.downlink, compressor, instruction.target_digest)
    except (DesyncError, PayloadError) as exc:
        logger.warning("node %s cannot sync: %s", node_id, exc)
        reply = Reply(node_id, STATUS_DESYNC, error=str(exc), partition_id=partition_id)
        return reply, replace(state, weights=None)
    base = get_flat(model)
    numel = base.numel()
    start = state.residual_for(instruction, compressor.uses_error_feedback)
    residual = start.to(device) if start is not None else torch.zeros(numel, device=device)
    seed = derive_seed(cfg.seed, SHUFFLE, instruction.server_round, partition_id)
    stats = train_local(
        model, data, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, device=device, seed=seed
    )
    update = get_flat(model) - base
    set_flat(model, base)
    model.eval()
    meta = PayloadMeta(Direction.UPLINK, instruction.server_round, digest_flat(base))
    residual = bounded_residual(residual, update, cfg.residual_cap)
    enc = compress_update(compressor, update + residual, model, meta, Budget(instruction.n_samples))
    reply = Reply(
        node_id=node_id,
        partition_id=partition_id,
        status=STATUS_OK,
        payload=enc.data,
        num_examples=stats.num_examples,
        metrics={
            "cosine": enc.cosine,
            "residual-ratio": enc.residual_ratio,
            "update-residual-ratio": update_ratio(enc.residual, update),
            "compress-seconds": enc.stats.seconds,
            "train-seconds": stats.seconds,
            "train-loss": stats.loss,
        },
    )
    if not compressor.uses_error_feedback:  # FedAvg, QSGD: the weights are all a client needs
        return reply, ClientState(base.cpu())
    new_state = ClientState(
        base.cpu(), enc.residual.cpu(), enc.transmitted.cpu(), instruction.server_round, residual.cpu()
    )
    return reply, new_state


def update_ratio(residual: torch.Tensor, update: torch.Tensor) -> float:
    """||r|| / ||d||: the error-feedback memory against the fresh local update (the
    budget's signal; it grows without bound where compression cannot keep up, whereas
    ||r|| / ||t|| stays below 1)."""
    d_norm = float(update.norm())
    return float(residual.norm()) / d_norm if d_norm > 0 else 0.0


def client_state_file(state_dir: str | Path, partition_id: int) -> Path:
    """Where a client keeps its state between processes: one file per partition, so a
    node restarted on the same partition (or the in-process loop) finds it again."""
    return Path(state_dir) / f"client-{partition_id}.npz"


def save_client_state(path: Path, state: ClientState) -> None:
    """Persist a client's state atomically (survives a SuperNode or process restart)."""
    save_checkpoint(path, state.to_tensors(), {"kind": "e3sfc-client-state"})


def load_client_state(path: Path) -> ClientState:
    """Read what :func:`save_client_state` wrote; a missing file is an empty state."""
    if not path.exists():
        return ClientState()
    tensors, _ = load_checkpoint(path)
    return ClientState.from_tensors(tensors)
