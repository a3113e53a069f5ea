"""Baseline compressors: FedAvg (dense), Top-k, STC, scaled signSGD and QSGD.

Every method works on one flat float32 target vector whose length is the model's
number of weights; the model is only used to check that length and to pick the device
of the reconstruction. All methods are vectorised torch and run on CPU or CUDA.

Registry keys (``COMPRESSORS``) and ``encoded_size(numel, budget)`` (computed by the
size functions next to ``encode`` in :mod:`e3sfc_core.payload`), with ``F`` = 4 bytes
(float32) or 2 bytes (``settings.float16``), ``k = topk_count(settings.topk_ratio, numel)``,
``P = compact.positions_bytes_bound(numel, k)``, ``s = settings.qsgd_levels`` and
``nb = ceil(numel / settings.qsgd_bucket_size)``:

========== ================ =========== ===================================================
key        class            codec       ``encoded_size``
========== ================ =========== ===================================================
fedavg     FedAvgCompressor DENSE       ``28 + F * numel`` (exact)
topk       TopKCompressor   TOPK        ``28 + 6 + F * k + P`` (upper bound)
stc        STCCompressor    STC         ``28 + 10 + ceil(k / 8) + P`` (upper bound)
signsgd    SignCompressor   SIGN        ``28 + 4 + ceil(numel / 8)`` (exact)
qsgd       QSGDCompressor   QSGD        ``28 + 6 + 4 * nb + ceil(numel * ceil(log2(2s+1)) / 8)``
                                        (upper bound: the packed levels, the most QSGD sends)
========== ================ =========== ===================================================

Top-k, STC and QSGD code positions and levels with variable-length codes (format v3,
``e3sfc_core.compact``), so their size depends on the data: ``encoded_size`` is then the
most ``len(encode(payload))`` can be (exact when ``k`` is 0 or ``numel``), which is what
budgets and byte limits need; :meth:`TopKCompressor.k_for_bytes` answers "how many
entries fit in B bytes" with that bound, so the real payload never exceeds B.

The compressors never touch error feedback themselves; ``uses_error_feedback`` tells
the round logic whether to keep a residual (Top-k, STC, signSGD) or not (FedAvg, QSGD).

Float bodies (dense values, top-k values) are already rounded to the wire dtype inside
``compress`` (and clamped to the float16 range when ``settings.float16``), so
``decompress(p)`` equals ``decompress(decode(encode(p)))`` bit for bit. Scalar fields
(STC magnitude, sign scale, QSGD norm) are float32 on the wire and are likewise rounded
to float32 in ``compress``.
"""

from __future__ import annotations

import math
import struct
import time

import torch
from torch import nn

from .budget import largest_fitting
from .compressor import (
    Budget,
    CompressorSettings,
    CompressStats,
    PayloadMeta,
    register,
)
from .errors import ConfigError, PayloadRejected
from .payload import (
    FLOAT32_MAX,
    MAX_QSGD_BUCKET,
    MAX_QSGD_LEVELS,
    Codec,
    DenseBody,
    FloatType,
    Payload,
    QuantBody,
    SignBody,
    SparseBody,
    TernaryBody,
    dense_size,
    float_width,
    qsgd_size,
    sign_size,
    sparse_size,
    ternary_size,
    wire_rounded,
)
from .seeds import QSGD, derive_seed
from .tensors import num_params


def topk_count(ratio: float, numel: int) -> int:
    """Number of kept entries for Top-k/STC: ``max(1, ceil(ratio * numel))``, at most numel.

    The product is rounded to 6 decimals before ``ceil`` so that binary round-off such as
    ``0.07 * 100 == 7.000000000000001`` does not keep one entry too many.
    """
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(round(ratio * numel, 6))))


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (what the wire's f32 fields carry)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sync_device(t: torch.Tensor) -> None:
    """Wait for ``t``'s GPU work, so that a compressor's timing covers it."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


class BaselineCompressor:
    """Shared plumbing of the array compressors (every method but 3SFC): settings, input
    checks, header fields, payload checks; a subclass supplies ``_body`` and
    ``decompress``."""

    name: str = ""
    codec: Codec = Codec.DENSE
    uses_error_feedback: bool = False
    body_type: type = DenseBody

    def __init__(self, settings: CompressorSettings) -> None:
        self.settings = settings
        self.float_type = FloatType.FLOAT16 if settings.float16 else FloatType.FLOAT32
        self.float_bytes = float_width(self.float_type)

    # -------------------------------------------------------------------- helpers

    def _target(self, target: torch.Tensor, model: nn.Module) -> torch.Tensor:
        flat = target.detach().reshape(-1).to(torch.float32)
        n = num_params(model)
        if flat.numel() != n:
            raise ValueError(f"{self.name}: target has {flat.numel()} values, model has {n}")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"{self.name}: target contains NaN or Inf")
        return flat

    def _payload(self, meta: PayloadMeta, numel: int, body: object) -> Payload:
        return Payload(
            codec=self.codec,
            direction=meta.direction,
            server_round=meta.server_round,
            base_digest=meta.base_digest,
            numel=numel,
            body=body,  # type: ignore[arg-type]
            float_type=self.float_type,
        )

    def _check(self, payload: Payload, model: nn.Module) -> tuple[int, torch.device]:
        if payload.codec != self.codec:
            raise PayloadRejected(
                f"{self.name} expects codec {self.codec.name}, payload has {payload.codec.name}"
            )
        n = num_params(model)
        if payload.numel != n:
            raise PayloadRejected(
                f"{self.name}: payload numel {payload.numel} does not match the model's {n}"
            )
        if not isinstance(payload.body, self.body_type):
            raise PayloadRejected(
                f"{self.name} expects a {self.body_type.__name__}, got {type(payload.body).__name__}"
            )
        return n, _model_device(model)

    def compress(
        self, target: torch.Tensor, model: nn.Module, meta: PayloadMeta, budget: Budget
    ) -> tuple[Payload, CompressStats]:
        start = time.perf_counter()
        flat = self._target(target, model)
        body = self._body(flat, meta)
        sync_device(flat)
        payload = self._payload(meta, flat.numel(), body)
        return payload, CompressStats(seconds=time.perf_counter() - start)

    def _body(self, flat: torch.Tensor, meta: PayloadMeta) -> object:  # pragma: no cover
        raise NotImplementedError


# ------------------------------------------------------------------------- FedAvg


class FedAvgCompressor(BaselineCompressor):
    """No compression: the full vector in the wire float dtype."""

    name = "fedavg"
    codec = Codec.DENSE
    uses_error_feedback = False
    body_type = DenseBody

    def _body(self, flat: torch.Tensor, meta: PayloadMeta) -> DenseBody:
        return DenseBody(values=wire_rounded(flat, self.float_type))

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        _, device = self._check(payload, model)
        body: DenseBody = payload.body  # type: ignore[assignment]
        return body.values.detach().reshape(-1).to(device, torch.float32).clone()

    def encoded_size(self, numel: int, budget: Budget) -> int:
        return dense_size(numel, self.float_type)


# -------------------------------------------------------------------------- Top-k


def topk_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest magnitudes, sorted ascending (int64)."""
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    return torch.sort(idx).values.to(torch.int64)


class TopKCompressor(BaselineCompressor):
    """Top-k sparsification with error feedback (values sent in the wire float dtype)."""

    name = "topk"
    codec = Codec.TOPK
    uses_error_feedback = True
    body_type: type = SparseBody

    def __init__(self, settings: CompressorSettings) -> None:
        super().__init__(settings)
        ratio = settings.topk_ratio
        if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
            raise ConfigError(f"topk_ratio must be in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)

    def k(self, numel: int) -> int:
        return topk_count(self.ratio, numel)

    def _body(self, flat: torch.Tensor, meta: PayloadMeta) -> SparseBody | TernaryBody:
        return self.keep(flat, self.k(flat.numel()))

    def keep(self, flat: torch.Tensor, k: int) -> SparseBody:
        """The ``k`` largest-magnitude entries of ``flat``, values as the wire carries them."""
        idx = topk_indices(flat, k)
        return SparseBody(indices=idx, values=wire_rounded(flat[idx], self.float_type))

    def sent_values(self, body: SparseBody, device: torch.device) -> torch.Tensor:
        """The float32 values the receiver puts at ``body``'s indices."""
        return body.values.reshape(-1).to(device, torch.float32)

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        n, device = self._check(payload, model)
        body: SparseBody = payload.body  # type: ignore[assignment]
        out = torch.zeros(n, dtype=torch.float32, device=device)
        out[body.indices.to(device, torch.int64)] = self.sent_values(body, device)
        return out

    def size_for_k(self, numel: int, k: int) -> int:
        """Most bytes a payload keeping ``k`` of ``numel`` entries can take."""
        return sparse_size(numel, k, self.float_type)

    def encoded_size(self, numel: int, budget: Budget) -> int:
        """Upper bound of ``len(encode(payload))`` (exact for ``k`` = 0 or ``numel``)."""
        return self.size_for_k(numel, self.k(numel))

    def k_for_bytes(self, numel: int, nbytes: int) -> int:
        """Largest ``k`` whose payload is certain to fit in ``nbytes`` (0 if none does);
        :meth:`size_for_k` grows with ``k``, so a binary search finds it."""
        return largest_fitting(lambda k: self.size_for_k(numel, k) <= nbytes, 0, numel) or 0


# ---------------------------------------------------------------------------- STC


class STCCompressor(TopKCompressor):
    """Sparse Ternary Compression (Sattler et al. 2019): top-k, then ``mu * sign``.

    ``mu`` is the mean magnitude of the kept values, rounded to float32. An all-zero
    target sends ``k`` indices with ``mu = 0``.
    """

    name = "stc"
    codec = Codec.STC
    uses_error_feedback = True
    body_type = TernaryBody

    def keep(self, flat: torch.Tensor, k: int) -> TernaryBody:  # type: ignore[override]
        """The ``k`` largest-magnitude entries of ``flat`` as ``mu * sign``."""
        idx = topk_indices(flat, k)
        kept = flat[idx]
        mu = float(kept.abs().double().mean()) if kept.numel() else 0.0
        mu = _f32(min(mu, FLOAT32_MAX))
        return TernaryBody(indices=idx, negative=kept < 0, magnitude=mu)

    def sent_values(self, body: TernaryBody, device: torch.device) -> torch.Tensor:  # type: ignore[override]
        """``mu`` with each kept index's sign, float32."""
        neg = body.negative.reshape(-1).to(device, torch.bool)
        mu = torch.tensor(body.magnitude, dtype=torch.float32, device=device)
        return torch.where(neg, -mu, mu)

    def size_for_k(self, numel: int, k: int) -> int:
        return ternary_size(numel, k)


# ------------------------------------------------------------------------ signSGD


class SignCompressor(BaselineCompressor):
    """Scaled sign / EF-signSGD (Karimireddy et al. 2019): ``(||t||_1 / numel) * sign(t)``.

    Zero counts as positive. The scale is rounded to float32.
    """

    name = "signsgd"
    codec = Codec.SIGN
    uses_error_feedback = True
    body_type = SignBody

    def _body(self, flat: torch.Tensor, meta: PayloadMeta) -> SignBody:
        n = flat.numel()
        scale = float(flat.double().abs().sum()) / n if n else 0.0
        return SignBody(negative=flat < 0, scale=_f32(min(scale, FLOAT32_MAX)))

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        _, device = self._check(payload, model)
        body: SignBody = payload.body  # type: ignore[assignment]
        neg = body.negative.reshape(-1).to(device, torch.bool)
        s = torch.tensor(body.scale, dtype=torch.float32, device=device)
        return torch.where(neg, -s, s)

    def encoded_size(self, numel: int, budget: Budget) -> int:
        return sign_size(numel)


# --------------------------------------------------------------------------- QSGD


class QSGDCompressor(BaselineCompressor):
    """QSGD (Alistarh et al. 2017) with ``s`` levels, buckets and seeded stochastic rounding.

    The target is cut into buckets of ``settings.qsgd_bucket_size`` entries (512 in the
    paper; the last may be shorter). In each, ``q_i = sign(t_i) * (floor(s|t_i|/norm) +
    Bernoulli(frac))`` and the receiver reconstructs ``norm * q / s``. A bucket's ``norm``
    is its ``||t||_2`` rounded *up* to float32, so the wire value is exactly the one used
    for rounding (keeping the estimator unbiased) and ``|q| <= s`` holds. The uniforms
    come from a CPU ``torch.Generator`` seeded by ``derive_seed(settings.seed,
    QSGD, meta.server_round, meta.direction)``, so the result is the same on every device and
    for every repeated call with the same meta.
    """

    name = "qsgd"
    codec = Codec.QSGD
    uses_error_feedback = False
    body_type = QuantBody

    def __init__(self, settings: CompressorSettings) -> None:
        super().__init__(settings)
        s = settings.qsgd_levels
        if not (isinstance(s, int) and 1 <= s <= MAX_QSGD_LEVELS):
            raise ConfigError(f"qsgd_levels must be an integer in 1..{MAX_QSGD_LEVELS}, got {s!r}")
        bucket = settings.qsgd_bucket_size
        if not (isinstance(bucket, int) and 1 <= bucket <= MAX_QSGD_BUCKET):
            raise ConfigError(f"qsgd_bucket_size must be an integer in 1..{MAX_QSGD_BUCKET}, got {bucket!r}")
        self.levels, self.bucket_size = s, bucket

    def _norms(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-bucket L2 norms rounded up to float32 (float64 [n_buckets])."""
        n, bucket = flat.numel(), self.bucket_size
        n_buckets = -(-n // bucket)
        padded = torch.zeros(n_buckets * bucket, dtype=torch.float64, device=flat.device)
        padded[:n] = flat.double()
        norms = torch.linalg.vector_norm(padded.view(n_buckets, bucket), dim=1).clamp_(max=FLOAT32_MAX)
        up = norms.float()
        inf = torch.tensor(math.inf, device=up.device)
        return torch.where(up.double() < norms, torch.nextafter(up, inf), up).double()

    def _body(self, flat: torch.Tensor, meta: PayloadMeta) -> QuantBody:
        s, n = self.levels, flat.numel()
        norms = self._norms(flat)
        per_entry = norms.repeat_interleave(self.bucket_size)[:n]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(derive_seed(self.settings.seed, QSGD, meta.server_round, int(meta.direction)))
        u = torch.rand(n, generator=gen, dtype=torch.float64).to(flat.device)
        safe = torch.where(per_entry > 0, per_entry, torch.ones_like(per_entry))
        scaled = (flat.double().abs() * s / safe).clamp_(max=float(s))
        scaled = torch.where(per_entry > 0, scaled, torch.zeros_like(scaled))
        low = torch.floor(scaled)
        mag = low + (u < (scaled - low)).to(torch.float64)
        q = torch.where(flat < 0, -mag, mag).to(torch.int8)
        return QuantBody(norms=norms.float(), levels=s, q=q, bucket_size=self.bucket_size)

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        n, device = self._check(payload, model)
        body: QuantBody = payload.body  # type: ignore[assignment]
        step = body.norms.to(device, torch.float32) / body.levels
        per_entry = step.repeat_interleave(body.bucket_size)[:n]
        return body.q.reshape(-1).to(device, torch.float32) * per_entry

    def encoded_size(self, numel: int, budget: Budget) -> int:
        """Upper bound of ``len(encode(payload))``: the packed levels, never exceeded."""
        return qsgd_size(numel, self.levels, self.bucket_size)


# ----------------------------------------------------------------------- registry


@register("fedavg")
def _make_fedavg(
    settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int
) -> FedAvgCompressor:
    return FedAvgCompressor(settings)


@register("topk")
def _make_topk(settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int) -> TopKCompressor:
    return TopKCompressor(settings)


@register("stc")
def _make_stc(settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int) -> STCCompressor:
    return STCCompressor(settings)


@register("signsgd")
def _make_signsgd(
    settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int
) -> SignCompressor:
    return SignCompressor(settings)


@register("qsgd")
def _make_qsgd(settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int) -> QSGDCompressor:
    return QSGDCompressor(settings)


BASELINES: tuple[str, ...] = ("fedavg", "topk", "stc", "signsgd", "qsgd")
