"""3SFC: compress an update into a few synthetic samples whose gradient points along it.

Search variables are inputs ``X [n, *input_shape]`` (initialised from N(0, init_scale^2))
and soft labels ``Y [n, n_classes]`` (from N(0, 1)), drawn from a seeded generator.
SciPy's L-BFGS-B minimises ``1 - |cos(g(X, Y), t)|`` (a double backward through the
model). We use SciPy rather than ``torch.optim.LBFGS`` because its line search reaches a
given cosine in about half the closure evaluations, and evaluations are the whole cost
(``bench/compression_speed.py``). The scale is closed-form, the projection of the target
on the synthetic gradient, computed from the values *as they will be encoded* so that
what the receiver reconstructs is exactly what we measured.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn

from .compressor import Budget, CompressorSettings, CompressStats, PayloadMeta, register
from .decompressor import synthesize_update, synthetic_gradient
from .errors import PayloadRejected
from .payload import HEADER_SIZE as _HEADER
from .payload import Codec, FloatType, Payload, SyntheticBody
from .tensors import num_params

logger = logging.getLogger(__name__)

_SYNTH_FIXED = 4 + 2 + 2 + 1 + 3  # scale, n, n_classes, ndim, padding
LBFGS_HISTORY = 10  # correction pairs kept by L-BFGS-B


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
        """L-BFGS-B over (X, Y) flattened into one vector; the best iterate is kept."""
        s = self.settings
        gen = torch.Generator().manual_seed(_seed(s.seed, meta))
        x0 = torch.randn((n, *self.input_shape), generator=gen) * s.init_scale
        y0 = torch.randn((n, self.n_classes), generator=gen)
        start = torch.cat([x0.reshape(-1), y0.reshape(-1)]).double().numpy()
        objective = _CosineObjective(model, target, x0.shape, y0.shape, s, start)
        if float(objective.t_norm) > 0.0:
            try:
                minimize(
                    objective,
                    start,
                    jac=True,
                    method="L-BFGS-B",
                    options={"maxcor": LBFGS_HISTORY, "maxiter": s.max_evals, "maxfun": 2 * s.max_evals},
                )
            except _StopSearch:
                pass
        x, y = objective.split(torch.from_numpy(objective.best_z).float())
        return x.to(target.device), y.to(target.device), objective.evals


class _StopSearch(Exception):
    """Raised by the objective to end the search: cap reached, cosine stalled or diverged."""


class _CosineObjective:
    """``z -> (1 - |cos(g(X, Y), t)|, gradient)`` for SciPy, with the stopping rules.

    SciPy's L-BFGS-B may exceed ``maxfun`` inside a line search, so the cap on closure
    evaluations is enforced here; so is the stall rule (best |cos| improved by less than
    ``min_improvement`` over the last ``stall_window`` evaluations).
    """

    def __init__(
        self,
        model: nn.Module,
        target: torch.Tensor,
        x_shape: torch.Size,
        y_shape: torch.Size,
        settings: CompressorSettings,
        start: np.ndarray,
    ) -> None:
        self.model, self.target, self.settings = model, target, settings
        self.params = list(model.parameters())  # walking the modules costs on every call
        self.t_norm = target.norm()
        self.x_shape, self.y_shape = x_shape, y_shape
        self.nx = math.prod(x_shape)
        self.evals = 0
        self.best_cos = -1.0
        self.best_z = start.copy()  # what is sent if no evaluation succeeds
        self.history: list[float] = []  # best |cos| after each evaluation

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat search vector as (inputs, labels) views."""
        return z[: self.nx].view(self.x_shape), z[self.nx :].view(self.y_shape)

    def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        s = self.settings
        if self.evals >= s.max_evals:
            raise _StopSearch
        self.evals += 1
        zt = torch.from_numpy(z).to(self.target.device, torch.float32).requires_grad_(True)
        x, y = self.split(zt)
        g = synthetic_gradient(self.model, x, y, create_graph=True, params=self.params)
        # fewer autograd nodes than g.norm(); a zero g gives NaN, which stops the search
        cos = torch.dot(g, self.target) * torch.rsqrt(torch.dot(g, g)) / self.t_norm
        # gradient w.r.t. the search variables only (loss.backward() would also fill the
        # weights' .grad)
        (grad,) = torch.autograd.grad(-cos.abs(), [zt])
        value = float(cos.detach().abs())
        if not math.isfinite(value):
            raise _StopSearch  # diverged: the best iterate so far is kept
        if value > self.best_cos:
            self.best_cos, self.best_z = value, z.copy()
        self.history.append(self.best_cos)
        w = s.stall_window
        if len(self.history) > w and self.history[-1] - self.history[-1 - w] < s.min_improvement:
            raise _StopSearch
        return 1.0 - value, grad.detach().double().cpu().numpy()


@register("3sfc")
def _build(
    settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int
) -> SyntheticFeatureCompressor:
    return SyntheticFeatureCompressor(settings, input_shape, n_classes)
