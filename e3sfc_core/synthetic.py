"""3SFC: compress an update into a few synthetic samples whose gradient points along it.

Search variables are inputs ``X [n, *input_shape]`` (initialised from N(0, init_scale^2))
and soft labels ``Y [n, n_classes]`` (from N(0, 1)), drawn from a seeded generator.
SciPy's L-BFGS-B minimises ``1 - |cos(g(X, Y), t)|`` (a double backward through the
model). With ``scale-mode = "layer"`` (the default) each parameter tensor ``l`` gets its
own least-squares scale ``a_l = <g_l, t_l> / |g_l|^2``, sent as one float32 each, and the
search maximises the cosine *after* those scales, ``sqrt(sum_l <g_l,t_l>^2/|g_l|^2) / |t|``:
a synthetic gradient whose layers point the right way but have the wrong relative sizes
(a few samples' gradient is not shaped like many SGD steps) is then no longer penalised,
and every layer's magnitude is right even where its direction is poor. ``"global"`` is
the paper's single scale. We use SciPy rather than ``torch.optim.LBFGS`` because its line
search reaches a given cosine in about half the closure evaluations, and evaluations are
the whole cost (``bench/compression_speed.py``). The scales are closed-form projections
of the target on the synthetic gradient, computed from the values *as they will be
encoded* so that what the receiver reconstructs is exactly what we measured.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch import nn

from .compressor import (
    Budget,
    Compressor,
    CompressorSettings,
    CompressStats,
    PayloadMeta,
    checked_body,
    register,
)
from .errors import ConfigError, PayloadRejected
from .payload import FLOAT32_MAX, Codec, FloatType, Payload, SyntheticBody, synthetic_size, wire_rounded
from .seeds import SYNTHETIC, derive_seed
from .synthetic_gradient import parameter_sizes, synthesize_update, synthetic_gradient

logger = logging.getLogger(__name__)

LBFGS_HISTORY = 10  # correction pairs kept by L-BFGS-B


def init_seed(settings_seed: int, meta: PayloadMeta) -> int:
    """Distinct, reproducible initialisation per (compressor seed, round, direction)."""
    return derive_seed(settings_seed, SYNTHETIC, meta.server_round, int(meta.direction))


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
        self.layerwise = settings.scale_mode == "layer"

    def encoded_size(self, numel: int, budget: Budget) -> int:
        """Exact size of this compressor's payload with ``budget.n_samples`` samples."""
        if self.layerwise and self.settings.layer_count < 1:
            raise ConfigError("per-layer scales need the model's layer_count to size a payload")
        layers = self.settings.layer_count if self.layerwise else 0
        return synthetic_size(budget.n_samples, self.input_shape, self.n_classes, self.float_type, layers)

    def compress(
        self, target: torch.Tensor, model: nn.Module, meta: PayloadMeta, budget: Budget
    ) -> tuple[Payload, CompressStats]:
        """Search a synthetic batch for ``target`` at the model's current weights."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        target = target.to(device, torch.float32)
        model.eval()
        inputs, labels, evals = self._search(target, model, budget.n_samples, meta)
        # a search may wander past float16's range: the scales are fitted to what decodes
        inputs, labels = wire_rounded(inputs, self.float_type), wire_rounded(labels, self.float_type)
        g = synthesize_update(model, inputs, labels, 1.0)
        if self.layerwise:
            scale, layer_scales, degenerate = 1.0, *_layer_scales(g, target, parameter_sizes(model))
        else:
            layer_scales = None
            gg = float(torch.dot(g, g))
            scale = float(torch.dot(g, target)) / gg if gg > 0 else float("nan")
            degenerate = not _finite_f32(scale)
            if degenerate:
                logger.warning("3SFC scale is not finite (|g|^2=%g); sending a zero update", gg)
                scale = 0.0
        payload = Payload(
            codec=self.codec,
            direction=meta.direction,
            server_round=meta.server_round,
            base_digest=meta.base_digest,
            numel=target.numel(),
            body=SyntheticBody(
                scale=scale, inputs=inputs.cpu(), labels=labels.cpu(), layer_scales=layer_scales
            ),
            float_type=self.float_type,
        )
        return payload, CompressStats(time.perf_counter() - start, evals, degenerate)

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        """Recompute ``scale * grad`` at the model's weights (must be the base weights)."""
        body = checked_body(payload, self.codec, SyntheticBody, model)
        if tuple(body.inputs.shape[1:]) != self.input_shape or body.labels.shape[1] != self.n_classes:
            raise PayloadRejected(
                f"synthetic shapes {tuple(body.inputs.shape[1:])}/{body.labels.shape[1]} do not "
                f"match the model's input {self.input_shape}/{self.n_classes} classes"
            )
        sizes = parameter_sizes(model)
        if body.layer_scales is not None and body.layer_scales.numel() != len(sizes):
            raise PayloadRejected(
                f"payload has {body.layer_scales.numel()} layer scales, the model has "
                f"{len(sizes)} parameter tensors"
            )
        return synthesize_update(model, body.inputs, body.labels, body.scale, body.layer_scales)

    # ------------------------------------------------------------------------ internals

    def _search(
        self, target: torch.Tensor, model: nn.Module, n: int, meta: PayloadMeta
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """L-BFGS-B over (X, Y) flattened into one vector; the best iterate is kept."""
        s = self.settings
        gen = torch.Generator().manual_seed(init_seed(s.seed, meta))
        x0 = torch.randn((n, *self.input_shape), generator=gen) * s.init_scale
        y0 = torch.randn((n, self.n_classes), generator=gen)
        start = torch.cat([x0.reshape(-1), y0.reshape(-1)]).double().numpy()
        from scipy.optimize import minimize  # imported here: only 3SFC runs need SciPy

        objective = CosineObjective(model, target, x0.shape, y0.shape, s, start, self.layerwise)
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


def _finite_f32(x: float) -> bool:
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX


def _layer_scales(g: torch.Tensor, target: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, bool]:
    """Least-squares scale per parameter tensor (float32 as sent); a block whose synthetic
    gradient is zero, or whose scale does not fit a float32, gets scale 0."""
    scales = []
    degenerate = False
    for g_l, t_l in zip(g.double().split(sizes), target.double().split(sizes), strict=True):
        gg = float(torch.dot(g_l, g_l))
        a = float(torch.dot(g_l, t_l)) / gg if gg > 0 else 0.0
        if not _finite_f32(a):
            degenerate, a = True, 0.0
        scales.append(a)
    if degenerate:
        logger.warning("3SFC: a layer scale is not finite; that layer is sent as zero")
    return torch.tensor(scales, dtype=torch.float32), degenerate


class _StopSearch(Exception):
    """Raised by the objective to end the search: cap reached, cosine stalled or diverged."""


class CosineObjective:
    """``z -> (1 - |cos(g(X, Y), t)|, gradient)`` for SciPy, with the stopping rules.

    SciPy's L-BFGS-B may exceed ``maxfun`` inside a line search, so the cap on closure
    evaluations is enforced here; so is the stall rule (best |cos| improved by less than
    ``min_improvement`` over the last ``stall_window`` evaluations). Public so that
    benchmarks time the search itself (``bench/compression_speed.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        target: torch.Tensor,
        x_shape: torch.Size,
        y_shape: torch.Size,
        settings: CompressorSettings,
        start: np.ndarray,
        layerwise: bool = False,
    ) -> None:
        self.model, self.target, self.settings = model, target, settings
        self.params = list(model.parameters())  # walking the modules costs on every call
        self.t_norm = target.norm()
        self.segments: torch.Tensor | None = None
        if layerwise:
            sizes = torch.tensor([p.numel() for p in self.params], device=target.device)
            self.segments = torch.repeat_interleave(
                torch.arange(len(self.params), device=target.device), sizes
            )
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
        cos = self._cosine(g)
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

    def _cosine(self, g: torch.Tensor) -> torch.Tensor:
        """cos(g, t), or with per-layer scales the cosine of the best layer-wise rescaling
        of g: ``sqrt(sum_l <g_l,t_l>^2 / |g_l|^2) / |t|`` (always >= 0)."""
        if self.segments is None:
            # fewer autograd nodes than g.norm(); a zero g gives NaN, which stops the search
            return torch.dot(g, self.target) * torch.rsqrt(torch.dot(g, g)) / self.t_norm
        n = len(self.params)
        dots = torch.zeros(n, device=g.device).index_add(0, self.segments, g * self.target)
        norms = torch.zeros(n, device=g.device).index_add(0, self.segments, g * g)
        explained = (dots * dots / norms.clamp_min(1e-30)).sum()
        return torch.sqrt(explained) / self.t_norm


@register("3sfc")
def _build(settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int) -> Compressor:
    """The paper's 3SFC, or with ``correction_share > 0`` its corrected variant."""
    if settings.correction_share > 0:
        from .corrected import CorrectedSyntheticCompressor  # it builds on this module

        return CorrectedSyntheticCompressor(settings, input_shape, n_classes)
    return SyntheticFeatureCompressor(settings, input_shape, n_classes)
