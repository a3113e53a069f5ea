"""PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019) as a baseline: rank-r updates.

Each parameter tensor with two or more dimensions is viewed as a matrix ``M`` of shape
``(out, rest)`` and sent as ``P, Q`` with ``M ~ P @ Q.T`` after one power iteration:
``P = orth(M @ Q0)`` (QR), ``Q = M.T @ P``. Tensors with one dimension (biases, norms)
and matrices where rank ``r`` would not save bytes (``r * (rows + cols) >= rows * cols``)
are sent dense. Error feedback is on (``rounds.compress_update`` keeps
``target - P @ Q.T``), as in the paper, on the clients and, with
``downlink = "compressed"``, on the server.

*Q0 is drawn fresh, not warm-started.* The paper reuses the previous step's ``Q`` because,
in data-parallel SGD, consecutive gradients share their top subspace and every worker
takes part in every step. Here a client's previous ``Q`` is from the last round it was
sampled in, possibly many rounds and global models ago, and does not exist at all for a
new or restarted client; keeping it would also add per-client state that must survive
process restarts (``ClientState`` holds weights and residual only) and that the server
cannot check. So ``Q0`` is a standard normal matrix from a CPU generator seeded by
``(settings.seed, round, direction, record index)`` (``seeds.POWERSGD``): stateless,
reproducible on every device, and a random start for one power iteration is a randomised
range finder whose misses error feedback carries to the next round. Measured on digits/MLP
(``bench/results/powersgd_q0.md``, 3 seeds, all or 30% of clients per round), warm
starts were no better: within a standard deviation at ranks 2 to 8, 6 points worse at
rank 1 with every client. ``Q0`` never travels: ``P`` and ``Q`` do (``r * (rows + cols)``
floats per matrix).

*Default rank 4* (``powersgd-rank``): there, rank 4 matched FedAvg's accuracy (91.4% vs
92.0% with every client, 89.1% vs 89.0% with 30%) with 14x fewer uplink bytes, rank 8
was no better for twice the bytes and rank 2 lost 4 to 12 points. The paper's rank 2
relies on the warm start and on a fresh gradient every step, which federated rounds lack.

Each client reconstructs its own ``P @ Q.T`` at the server (no all-reduce, so no shared
``Q0`` is needed); the aggregate of K clients has rank up to ``K * r``, which the
compressed downlink brings back to rank ``r`` with server-side error feedback.

The payload size depends only on the parameter shapes, so ``encoded_size`` is exact; the
shapes come from the model named in ``settings.model`` (the registry builds it once).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from .baselines import BaselineCompressor, sync_device
from .compressor import Budget, CompressorSettings, CompressStats, PayloadMeta, register
from .errors import ConfigError, PayloadRejected
from .lowrank import MAX_RANK, LowRankBody, record_floats
from .models import build_model
from .payload import FLOAT32_MAX, Codec, Payload, lowrank_size, wire_rounded
from .seeds import POWERSGD, derive_seed

Layout = tuple[tuple[int, int, int], ...]


def plan_layout(shapes: Sequence[tuple[int, ...]], rank: int) -> Layout:
    """``(rows, cols, rank or 0)`` per non-empty tensor: low-rank where it saves bytes."""
    out = []
    for shape in shapes:
        numel = math.prod(int(d) for d in shape)
        if numel == 0:
            continue
        rows, cols = (int(shape[0]), numel // int(shape[0])) if len(shape) >= 2 else (numel, 1)
        low = len(shape) >= 2 and rank * (rows + cols) < rows * cols
        out.append((rows, cols, rank if low else 0))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def model_shapes(name: str, input_shape: tuple[int, ...], n_classes: int) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of a zoo model (built once per process and key)."""
    model = build_model(name, input_shape, n_classes, seed=0)
    return tuple(tuple(p.shape) for p in model.parameters())


class PowerSGDCompressor(BaselineCompressor):
    """Rank-``r`` PowerSGD with one power iteration from a seeded ``Q0``, error feedback."""

    name = "powersgd"
    codec = Codec.LOWRANK
    uses_error_feedback = True
    body_type = LowRankBody

    def __init__(self, settings: CompressorSettings, shapes: Sequence[tuple[int, ...]] | None = None) -> None:
        super().__init__(settings)
        rank = settings.powersgd_rank
        if not (isinstance(rank, int) and 1 <= rank <= MAX_RANK):
            raise ConfigError(f"powersgd_rank must be an integer in 1..{MAX_RANK}, got {rank!r}")
        self.rank = rank
        self.shapes = None if shapes is None else tuple(tuple(int(d) for d in s) for s in shapes)

    def _layout(self, model: nn.Module) -> Layout:
        shapes = tuple(tuple(p.shape) for p in model.parameters())
        if self.shapes is not None and shapes != self.shapes:
            raise ConfigError("powersgd: the model's parameter shapes differ from the configured model's")
        return plan_layout(shapes, self.rank)

    def initial_q(self, m: torch.Tensor, rank: int, meta: PayloadMeta, index: int) -> torch.Tensor:
        """The power iteration's start for record ``index``: seeded, never sent (a public
        extension point: ``bench/powersgd_q0.py`` overrides it to warm-start)."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(
            derive_seed(self.settings.seed, POWERSGD, meta.server_round, int(meta.direction), index)
        )
        return torch.randn(m.shape[1], rank, generator=gen, dtype=torch.float64).to(m.device)

    def factors(
        self, m: torch.Tensor, rank: int, meta: PayloadMeta, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One power iteration in float64; ``Q`` is fitted to the wire-rounded ``P``."""
        p = wire_rounded(torch.linalg.qr(m @ self.initial_q(m, rank, meta, index)).Q, self.float_type)
        q = (m.T @ p.double()).clamp(-FLOAT32_MAX, FLOAT32_MAX).float()
        return p, wire_rounded(q, self.float_type)

    def compress(
        self, target: torch.Tensor, model: nn.Module, meta: PayloadMeta, budget: Budget
    ) -> tuple[Payload, CompressStats]:
        start = time.perf_counter()
        flat = self._target(target, model)
        layout = self._layout(model)
        parts, offset = [], 0
        for index, (rows, cols, rank) in enumerate(layout):
            block = flat[offset : offset + rows * cols]
            offset += rows * cols
            if rank == 0:
                parts.append(wire_rounded(block, self.float_type))
                continue
            p, q = self.factors(block.double().view(rows, cols), rank, meta, index)
            parts += [p.reshape(-1), q.reshape(-1)]
        values = torch.cat(parts) if parts else flat.new_zeros(0)
        sync_device(values)
        payload = self._payload(meta, flat.numel(), LowRankBody(layout=layout, values=values))
        return payload, CompressStats(seconds=time.perf_counter() - start)

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        _, device = self._check(payload, model)
        body: LowRankBody = payload.body  # type: ignore[assignment]
        if body.layout != self._layout(model):
            raise PayloadRejected("powersgd: payload layout does not match this model and rank")
        values = body.values.reshape(-1).to(device, torch.float32)
        blocks, offset = [], 0
        for rows, cols, rank in body.layout:
            if rank == 0:
                blocks.append(values[offset : offset + rows * cols])
            else:
                p = values[offset : offset + rows * rank].view(rows, rank)
                q = values[offset + rows * rank : offset + rank * (rows + cols)].view(cols, rank)
                blocks.append((p @ q.T).reshape(-1))
            offset += record_floats(rows, cols, rank)
        return torch.cat(blocks) if blocks else values.new_zeros(0)

    def encoded_size(self, numel: int, budget: Budget) -> int:
        """Exact ``len(encode(payload))``: the layout is fixed by the parameter shapes."""
        if self.shapes is None:
            raise ConfigError("powersgd needs the model's parameter shapes to size a payload")
        layout = plan_layout(self.shapes, self.rank)
        if sum(r * c for r, c, _ in layout) != numel:
            raise ConfigError(f"powersgd: numel {numel} does not match the model's parameter shapes")
        return lowrank_size(layout, self.float_type)


@register("powersgd")
def _make_powersgd(
    settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int
) -> PowerSGDCompressor:
    shapes = model_shapes(settings.model, tuple(input_shape), int(n_classes)) if settings.model else None
    return PowerSGDCompressor(settings, shapes)
