"""3SFC: compress an update into a few synthetic samples whose gradient points along it.

Search variables are inputs ``X [n, *input_shape]`` and soft labels ``Y [n, n_classes]``,
initialised from N(0, 1) with a seeded generator. LBFGS minimises ``1 - |cos(g(X, Y), t)|``
(a double backward through the model). The scale is closed-form, the projection of the
target on the synthetic gradient, computed from the values *as they will be encoded* so
that what the receiver reconstructs is exactly what we measured.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .compressor import Budget, CompressorSettings, CompressStats, PayloadMeta, register
from .decompressor import synthesize_update, synthetic_gradient
from .errors import PayloadRejected
from .payload import HEADER_SIZE as _HEADER
from .payload import Codec, FloatType, Payload, SyntheticBody
from .tensors import num_params

logger = logging.getLogger(__name__)

_SYNTH_FIXED = 4 + 2 + 2 + 1 + 3  # scale, n, n_classes, ndim, padding


def _seed(settings_seed: int, meta: PayloadMeta) -> int:
    """Distinct, reproducible initialisation per (run seed, round, direction)."""
    return (settings_seed * 1_000_003 + meta.server_round * 2 + int(meta.direction)) % 2**63


class SyntheticFeatureCompressor:
    """The 3SFC compressor (uplink and, in E-3SFC, downlink)."""

    name = "3sfc"
    codec = Codec.SYNTHETIC
    uses_error_feedback = True

    def __init__(self, settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int) -> None:
        self.settings = settings
        self.input_shape = tuple(int(d) for d in input_shape)
        self.n_classes = int(n_classes)
        self.float_type = FloatType.FLOAT16 if settings.float16 else FloatType.FLOAT32

    def encoded_size(self, numel: int, budget: Budget) -> int:
        """Header + fixed fields + dims + ``n * (prod(input_shape) + n_classes)`` floats."""
        width = 2 if self.float_type == FloatType.FLOAT16 else 4
        per_sample = math.prod(self.input_shape) + self.n_classes
        return _HEADER + _SYNTH_FIXED + 4 * len(self.input_shape) + budget.n_samples * per_sample * width

    def compress(
        self, target: torch.Tensor, model: nn.Module, meta: PayloadMeta, budget: Budget
    ) -> tuple[Payload, CompressStats]:
        """Search a synthetic batch for ``target`` at the model's current weights."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        target = target.to(device, torch.float32)
        model.eval()
        inputs, labels, evals = self._search(target, model, budget.n_samples, meta)
        inputs, labels = self._as_encoded(inputs), self._as_encoded(labels)
        g = synthesize_update(model, inputs, labels, 1.0)
        gg = float(torch.dot(g, g))
        scale = float(torch.dot(g, target)) / gg if gg > 0 else float("nan")
        degenerate = not math.isfinite(scale) or not math.isfinite(
            float(torch.tensor(scale, dtype=torch.float32))
        )
        if degenerate:
            logger.warning("3SFC scale is not finite (|g|^2=%g); sending a zero update", gg)
            scale = 0.0
        payload = Payload(
            codec=self.codec,
            direction=meta.direction,
            server_round=meta.server_round,
            base_digest=meta.base_digest,
            numel=target.numel(),
            body=SyntheticBody(scale=scale, inputs=inputs.cpu(), labels=labels.cpu()),
            float_type=self.float_type,
        )
        return payload, CompressStats(time.perf_counter() - start, evals, degenerate)

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        """Recompute ``scale * grad`` at the model's weights (must be the base weights)."""
        body = payload.body
        if payload.codec != self.codec or not isinstance(body, SyntheticBody):
            raise PayloadRejected(f"expected a SYNTHETIC payload, got {payload.codec.name}")
        if payload.numel != num_params(model):
            raise PayloadRejected(f"payload numel {payload.numel} != model weights {num_params(model)}")
        if tuple(body.inputs.shape[1:]) != self.input_shape or body.labels.shape[1] != self.n_classes:
            raise PayloadRejected(
                f"synthetic shapes {tuple(body.inputs.shape[1:])}/{body.labels.shape[1]} do not "
                f"match the model's input {self.input_shape}/{self.n_classes} classes"
            )
        return synthesize_update(model, body.inputs, body.labels, body.scale)

    # ------------------------------------------------------------------------ internals

    def _as_encoded(self, t: torch.Tensor) -> torch.Tensor:
        """Round to the wire precision so the scale is fitted to what is decoded."""
        if self.float_type == FloatType.FLOAT16:
            return t.detach().half().float()
        return t.detach().float()

    def _search(
        self, target: torch.Tensor, model: nn.Module, n: int, meta: PayloadMeta
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """LBFGS over (X, Y); keep the best iterate; stop when |cos| stalls."""
        s = self.settings
        gen = torch.Generator().manual_seed(_seed(s.seed, meta))
        device = target.device
        x = torch.randn((n, *self.input_shape), generator=gen).to(device).requires_grad_(True)
        y = torch.randn((n, self.n_classes), generator=gen).to(device).requires_grad_(True)
        t_norm = target.norm()
        best = _Best(-1.0, x.detach().clone(), y.detach().clone())
        evals = 0
        if float(t_norm) == 0.0:
            return best.x, best.y, 0

        def closure() -> torch.Tensor:
            nonlocal evals
            evals += 1
            opt.zero_grad()
            g = synthetic_gradient(model, x, y, create_graph=True)
            cos = torch.dot(g, target) / (g.norm() * t_norm + 1e-12)
            loss = 1.0 - cos.abs()
            value = float(cos.detach().abs())
            if math.isfinite(value) and value > best.cos:
                best.cos, best.x, best.y = value, x.detach().clone(), y.detach().clone()
            loss.backward()
            return loss

        opt = torch.optim.LBFGS([x, y], lr=1.0, max_iter=s.evals_per_step, history_size=10)
        previous = -1.0
        while evals < s.max_evals:
            opt.step(closure)  # type: ignore[no-untyped-call]
            if not math.isfinite(float(x.detach().abs().sum() + y.detach().abs().sum())):
                break  # diverged: the best iterate so far is kept
            if best.cos - previous < s.min_improvement:
                break
            previous = best.cos
        return best.x, best.y, evals


@dataclass
class _Best:
    """Best iterate seen by any closure evaluation (LBFGS may end on a worse one)."""

    cos: float
    x: torch.Tensor
    y: torch.Tensor


@register("3sfc")
def _build(
    settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int
) -> SyntheticFeatureCompressor:
    return SyntheticFeatureCompressor(settings, input_shape, n_classes)
