"""Local training and evaluation on in-memory tensors: plain, seeded mini-batch SGD.

Clients and the server share these two functions so that "one local round" means the same
thing everywhere. Shuffling uses its own ``torch.Generator`` seeded by the caller, so a
run is reproducible and the global RNG is left alone. On CPU the result is bit-identical
for the same seed; on CUDA some kernels are not deterministic unless the caller enables
``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import TensorData
from .errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)


def _cpu() -> torch.device:
    return torch.device("cpu")


def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device("cuda")


def _auto() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


DEVICES: dict[str, Callable[[], torch.device]] = {"cpu": _cpu, "cuda": _cuda, "auto": _auto}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (must be available) or ``auto`` (cuda if available, else cpu)."""
    try:
        factory = DEVICES[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown device {name!r}; allowed: {', '.join(sorted(DEVICES))}") from None
    return factory()


@dataclass(frozen=True)
class TrainStats:
    """Outcome of :func:`train_local`: mean loss of the last epoch, examples per epoch, time."""

    loss: float
    num_examples: int
    seconds: float


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")


@torch.no_grad()
def sgd_step(
    params: Sequence[torch.Tensor],
    velocity: dict[int, torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> None:
    """One step of ``torch.optim.SGD`` (no dampening, no Nesterov), the same arithmetic in
    the same order. Written out because the first ``torch.optim`` optimiser of a process
    imports ``torch._dynamo`` (about 0.75 s on this project's CPU machine), and every
    deployed ClientApp is a fresh process. ``velocity`` keeps the momentum buffers by
    parameter index between steps."""
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        step = p.grad if not weight_decay else p.grad.add(p, alpha=weight_decay)
        if momentum:
            if i in velocity:
                step = velocity[i].mul_(momentum).add_(step)
            else:
                step = velocity[i] = torch.clone(step).detach()
        p.add_(step, alpha=-lr)


def train_local(
    model: nn.Module,
    data: TensorData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    seed: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> TrainStats:
    """Train ``model`` in place with SGD + cross-entropy; returns the last epoch's mean loss.

    The model is moved to ``device`` and left there, in train mode. A fresh optimiser is
    made per call, so momentum does not carry over between rounds. The last batch of an
    epoch may be smaller than ``batch_size``; the mean loss is weighted per example.
    """
    _check_positive(epochs=epochs, lr=lr, batch_size=batch_size)
    if momentum < 0 or weight_decay < 0:
        raise ConfigError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
    n = len(data)
    if n == 0:
        raise DatasetError("cannot train on an empty dataset (partition)")
    start = time.perf_counter()
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    velocity: dict[int, torch.Tensor] = {}  # momentum buffers, fresh per call
    x, y = data.x.to(device), data.y.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    epoch_loss = 0.0
    for _ in range(int(epochs)):
        order = torch.randperm(n, generator=generator).to(device)
        total = torch.zeros((), device=device)
        for batch in order.split(int(batch_size)):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            sgd_step(params, velocity, lr=lr, momentum=momentum, weight_decay=weight_decay)
            total += loss.detach() * len(batch)
        epoch_loss = float(total) / n
    seconds = time.perf_counter() - start
    logger.debug("trained %d epochs on %d examples: loss %.4f in %.2fs", epochs, n, epoch_loss, seconds)
    return TrainStats(loss=epoch_loss, num_examples=n, seconds=seconds)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TensorData, *, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy in [0, 1])``; leaves the model on ``device`` in eval mode."""
    _check_positive(batch_size=batch_size)
    n = len(data)
    if n == 0:
        raise DatasetError("cannot evaluate on an empty dataset")
    model.to(device)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for begin in range(0, n, int(batch_size)):
        xb = data.x[begin : begin + batch_size].to(device)
        yb = data.y[begin : begin + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(dim=1) == yb).sum()
    return float(loss_sum) / n, int(correct) / n


def apply_threads(num_threads: int) -> None:
    """Set torch's CPU threads for this process (0 leaves torch's default)."""
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
