"""Versioned, pickle-free wire format for every compressed update (format v5).

Everything that crosses the network for a model update is ``encode(payload)``; its
``len()`` is the byte count we report. ``decode`` trusts nothing: it checks every size
against ``len(data)`` before allocating and raises only :class:`PayloadError` subclasses.

Layout (little-endian; integers unsigned unless noted). Common header, 28 bytes:

====== ==== ==================================================================
offset size field
====== ==== ==================================================================
0      4    magic ``b"E3SF"``
4      1    format version (5; versions 1 to 4 still decode, see below)
5      1    direction: 0 uplink (client to server), 1 downlink
6      1    codec: 1 dense, 2 synthetic, 3 top-k, 4 STC, 5 sign, 6 QSGD, 7 weights, 8 bundle,
            9 low-rank (v3 and later), 10 corrected (v4 and later), 11 tagged corrected
            (v5 and later)
7      1    float dtype of the body's float arrays: 1 float32, 2 float16
8      4    server round
12     8    digest of the weights the payload is relative to (``tensors.digest_flat``)
20     4    ``numel``: length of the update vector (number of model weights)
24     4    body length; must equal ``len(data) - 28`` exactly
====== ==== ==================================================================

Bodies (``F`` = the header's float dtype; offsets from the start of the body):

* dense, weights: ``F[numel]`` (an update, or absolute weights for a full re-sync)
* synthetic: ``f32 scale, u16 n, u16 n_classes, u8 ndim, 1 zero byte, u16 n_layer_scales,
  u32 dims[ndim], f32 layer_scales[n_layer_scales], F inputs[n * prod(dims)],
  F labels[n * n_classes]``. The update is ``scale * g`` when ``n_layer_scales`` is 0, else
  ``scale * layer_scales[l] * g_l`` for each parameter tensor ``l`` of the model (the
  receiver checks that the count matches its model).
* top-k: offset 0 ``u32 k`` (``<= numel``), 4 ``u8 position mode``, 5 ``u8 rice``,
  6 ``F values[k]``, then the *positions section* to the end of the body.
* STC: offset 0 ``u32 k`` (``<= numel``), 4 ``f32 magnitude``, 8 ``u8 position mode``,
  9 ``u8 rice``, 10 ``sign bits[ceil(k/8)]`` (one per kept index, set: ``-magnitude``),
  then the positions section to the end of the body.
* sign: ``f32 scale, sign bits[ceil(numel/8)]``
* QSGD: offset 0 ``u8 s`` (levels, 1..127), 1 ``u8 level mode``, 2 ``u32 bucket``
  (1..65536), 6 ``f32 norms[ceil(numel / bucket)]``, then the *levels section* to the end
  of the body. Entry ``i`` is ``norms[i // bucket] * q_i / s`` with integer
  ``q_i`` in ``[-s, s]``. (The bucket limit keeps what ``decode`` allocates, one byte per
  entry, within 16384 times the body.)
* bundle (v2 and later): ``u16 count (>= 1), count x (f64 weight, u32 length,
  u8 payload[length])``: the update is ``sum_i weight_i * decompress(payload_i)`` in that
  order, every inner payload a complete, valid, non-bundle payload (of any readable
  version) with the same ``numel`` (a relayed downlink: the round's uplink payloads and
  their aggregation weights)
* low-rank (PowerSGD, v3 and later; ``e3sfc_core.lowrank``): ``u32 count``, ``count x
  (u32 rows, u32 cols, u16 rank)``, then ``F values`` to the end of the body: each
  record's floats in record order. Record ``j`` is the next ``rows * cols`` weights of the
  update (row-major; the records cover exactly ``numel``). Rank 0: ``rows * cols`` dense
  values. Rank ``r`` in 1..1024: ``P[rows x r]`` then ``Q[cols x r]`` (row-major), the
  block being ``P @ Q.T``; allowed only when ``r * (rows + cols) < rows * cols``.
  ``rows, cols >= 1``; the values fill the rest of the body exactly. Refused in v1/v2.
* corrected (3SFC with a Top-k correction, v4 and later; ``e3sfc_core.corrected``):
  ``u32 length``, then a synthetic body of exactly ``length`` bytes (none when 0), then a
  top-k body to the end: the update is the synthetic part's (if any) plus the top-k
  part's. Refused before v4.
* tagged corrected (v5 and later): ``u32 length, u8 correction codec`` (3 top-k, 4 STC),
  then a synthetic body of exactly ``length`` bytes (none when 0), then a body of that
  codec to the end: the correction's entries with their values, or with one magnitude
  and a sign each. Refused before v5.

Bit streams (``e3sfc_core.bitcodec``): bit ``i`` is bit ``i % 8`` of byte ``i // 8``;
fields are least significant bit first; ``unary(q)`` is ``q`` zero bits then a one;
``rice_b(g)`` is ``unary(g >> b)`` and the ``b``-bit field ``g mod 2^b``; ``gamma(v)``
(Elias-gamma, ``v >= 1``, ``L`` = bit length of ``v``) is ``unary(L - 1)`` and the
``(L-1)``-bit field ``v - 2^(L-1)``. A run of numbers in one code is written as all
their unary prefixes, then all their fields. Streams end with zero bits to a whole byte.

*Positions section* (``e3sfc_core.compact``) of the ``k`` strictly increasing indices,
with gaps ``g_0 = idx_0`` and ``g_j = idx_j - idx_(j-1) - 1``:

* mode 0, Rice: the stream ``rice_b(g_0) .. rice_b(g_(k-1))`` with ``b`` = the ``rice``
  byte, ``0 <= b <= 30``, the smallest ``b`` that minimises the stream's length;
* mode 1, bitmap: ``numel`` bits, bit ``i`` set iff ``i`` is kept (exactly ``ceil(numel/8)``
  bytes, ``k`` bits set); the ``rice`` byte is 0.

Mode 0 is used iff it takes fewer bytes than the bitmap (Rice with ``b = 0`` never takes
more: the bitmap is used for dense selections, where they tie).

*Levels section* of ``q_0 .. q_(numel-1)``, with ``m`` nonzero entries at ``p_j``:

* mode 0, gamma: ``u32 m``, then the stream ``gamma(p_j - p_(j-1))`` (``p_(-1) = -1``:
  one more than the zeros before each nonzero), ``gamma(|q_(p_j)|)``, then ``m`` sign
  bits (set: negative);
* mode 1, packed: ``q_i + s`` in ``ceil(log2(2s + 1))``-bit fields, ``numel`` of them;
* mode 2, Rice (v5 and later): ``u32 m, u32 m2, u8 b_run, u8 b_gap, u8 b_big``, then the
  stream ``rice_b_run(p_j - p_(j-1) - 1)`` (the zeros before each nonzero), then for the
  ``m2`` nonzeros whose magnitude is above 1 (none when ``s = 1``), at ``c_i`` among the
  ``m`` nonzeros, ``rice_b_gap(c_i - c_(i-1) - 1)`` (``c_(-1) = -1``) and then
  ``rice_b_big(|q| - 2)`` of each, then ``m`` sign bits; each parameter in ``0..30`` is the
  smallest that minimises its part of the stream (0 for an empty part).

The section is the one that takes fewest bytes (head bytes included); on a tie packed,
then Rice, then gamma. Before v5 the choice was between gamma and packed only (gamma iff
strictly smaller), and v3/v4 bodies are checked by that rule.

``decode`` refuses a mode or Rice parameter other than the one stated above, so every
body has exactly one encoding (``encode(decode(b)) == b``).

Version history: v1 (the first release) had 3 zero bytes where v2 has ``1 zero byte,
u16 n_layer_scales``, so a v1 synthetic payload is a v2 payload with no layer scales.
v1 and v2 sent top-k as ``u32 k, u32 indices[k], F values[k]``, STC as ``u32 k,
f32 magnitude, u32 indices[k], sign bits[ceil(k/8)]`` and QSGD as ``f32 norm, u8 s,
i8 q[numel]`` (one bucket); v3 codes positions and levels as above. Every other codec is
byte-identical in v1 to v5 apart from the version byte (bundles exist from v2).
v4 added the corrected codec and changed nothing else. v5 added the Rice mode of the
levels section (QSGD) and the tagged corrected codec, and changed nothing else. All
five versions decode (a v1/v2 QSGD body becomes one bucket of ``max(numel, 1)``
entries); ``encode`` writes v5.

Sign bits are packed little-endian within each byte (bit set = negative); unused bits of
the last byte must be zero. All floats must be finite.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .compact import (
    decode_levels,
    decode_positions,
    encode_levels,
    encode_positions,
    levels_bytes_bound,
    positions_bytes_bound,
)
from .errors import PayloadError, UnsupportedVersion
from .lowrank import RECORD as LOWRANK_RECORD
from .lowrank import LowRankBody, decode_lowrank, encode_lowrank, record_floats
from .tensors import DIGEST_SIZE

MAGIC = b"E3SF"
VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
HEADER = struct.Struct("<4sBBBBI8sII")
HEADER_SIZE = HEADER.size  # 28
MAX_NUMEL = 2**31 - 1
MAX_SAMPLES = 65535
MAX_INPUT_NUMEL = 2**24
MAX_NDIM = 4
MAX_QSGD_LEVELS = 127
MAX_QSGD_BUCKET = 65536
MAX_LAYER_SCALES = 65535
MAX_BUNDLE = 65535


class Direction(enum.IntEnum):
    """Which way a payload travels."""

    UPLINK = 0
    DOWNLINK = 1


class Codec(enum.IntEnum):
    """How the body encodes the update."""

    DENSE = 1
    SYNTHETIC = 2
    TOPK = 3
    STC = 4
    SIGN = 5
    QSGD = 6
    WEIGHTS = 7
    BUNDLE = 8
    LOWRANK = 9
    CORRECTED = 10
    CORRECTED_TAGGED = 11


class FloatType(enum.IntEnum):
    """Float width of the body's float arrays."""

    FLOAT32 = 1
    FLOAT16 = 2


FLOAT16_MAX = 65504.0
FLOAT32_MAX = float(np.finfo(np.float32).max)


def wire_rounded(values: torch.Tensor, float_type: FloatType) -> torch.Tensor:
    """``values`` as a body of ``float_type`` will decode them: clamped into that dtype's
    finite range (a value past float16's 65504 would encode as inf) and rounded to it.
    Compressors fit their scales and residuals to this, so encoding loses nothing more."""
    limit = FLOAT16_MAX if float_type == FloatType.FLOAT16 else FLOAT32_MAX
    out = values.detach().float().clamp(-limit, limit)
    return out.half().float() if float_type == FloatType.FLOAT16 else out


_NP_FLOAT: dict[FloatType, np.dtype[Any]] = {
    FloatType.FLOAT32: np.dtype("<f4"),
    FloatType.FLOAT16: np.dtype("<f2"),
}


@dataclass(frozen=True)
class DenseBody:
    """A full vector: an update (``Codec.DENSE``) or absolute weights (``Codec.WEIGHTS``)."""

    values: torch.Tensor


@dataclass(frozen=True)
class SyntheticBody:
    """3SFC: the receiver recomputes ``scale * grad CE(model(inputs), labels)``, each
    parameter tensor's block further multiplied by its ``layer_scales`` entry when given."""

    scale: float
    inputs: torch.Tensor  # [n, *input_shape]
    labels: torch.Tensor  # [n, n_classes]
    layer_scales: torch.Tensor | None = None  # float32 [number of parameter tensors]


@dataclass(frozen=True)
class SparseBody:
    """Top-k: values at strictly increasing indices, zeros elsewhere."""

    indices: torch.Tensor  # int64
    values: torch.Tensor


@dataclass(frozen=True)
class CorrectedBody:
    """3SFC with a sparse correction: the update is the synthetic part's plus the sparse
    part's (the largest entries of what the synthetic gradient missed: their values, or
    STC's one magnitude and their signs). ``synthetic`` is None when the sender found the
    bytes better spent on the sparse part alone."""

    synthetic: SyntheticBody | None
    correction: SparseBody | TernaryBody


@dataclass(frozen=True)
class TernaryBody:
    """STC: ``magnitude * sign`` at the kept indices, zeros elsewhere."""

    indices: torch.Tensor  # int64
    negative: torch.Tensor  # bool, one per index
    magnitude: float


@dataclass(frozen=True)
class SignBody:
    """Scaled sign: ``scale * sign`` for every weight."""

    negative: torch.Tensor  # bool [numel]
    scale: float


@dataclass(frozen=True)
class QuantBody:
    """QSGD: entry ``i`` is ``norms[i // bucket_size] * q[i] / levels`` with integer
    ``q`` in ``[-levels, levels]`` (one norm per bucket of ``bucket_size`` entries)."""

    norms: torch.Tensor  # float32 [ceil(numel / bucket_size)]
    levels: int
    q: torch.Tensor  # int8 [numel]
    bucket_size: int


@dataclass(frozen=True)
class BundleBody:
    """Several payloads applied as one weighted sum (the relayed downlink)."""

    weights: tuple[float, ...]
    payloads: tuple[bytes, ...]  # each a complete encoded payload (not a bundle)


Body = (
    DenseBody
    | SyntheticBody
    | SparseBody
    | TernaryBody
    | SignBody
    | QuantBody
    | BundleBody
    | LowRankBody
    | CorrectedBody
)


@dataclass(frozen=True)
class Payload:
    """One decoded message body: header fields plus a codec-specific body."""

    codec: Codec
    direction: Direction
    server_round: int
    base_digest: bytes
    numel: int
    body: Body
    float_type: FloatType = FloatType.FLOAT32


def carries_batch(payload: Payload) -> bool:
    """Whether ``payload`` carries a synthetic batch: every 3SFC payload, a corrected one
    unless its sender found the Top-k alone better (reported per round, so users see how
    much of a run the synthetic features carried)."""
    body = payload.body
    return isinstance(body, SyntheticBody) or (isinstance(body, CorrectedBody) and body.synthetic is not None)


# ---------------------------------------------------------------------------- encoding


def _floats(t: torch.Tensor, ft: FloatType, what: str) -> bytes:
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy().astype(_NP_FLOAT[ft])
    if not np.all(np.isfinite(arr)):
        raise PayloadError(f"{what} has non-finite values after casting to {ft.name}")
    return arr.tobytes()


def _finite_f32(x: float, what: str) -> bytes:
    try:
        packed = struct.pack("<f", x)
    except (OverflowError, struct.error):
        raise PayloadError(f"{what} is not finite in float32 (too large): {x!r}") from None
    if not math.isfinite(struct.unpack("<f", packed)[0]):
        raise PayloadError(f"{what} is not finite in float32: {x!r}")
    return packed


def _indices(idx: torch.Tensor, numel: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    arr = idx.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if arr.size and (arr[0] < 0 or arr[-1] >= numel or np.any(np.diff(arr) <= 0)):
        raise PayloadError("indices must be strictly increasing and inside [0, numel)")
    return arr


def _buckets(numel: int, bucket: int) -> int:
    return -(-numel // bucket)


def _encode_qsgd(b: QuantBody, numel: int) -> bytes:
    if not 1 <= b.levels <= MAX_QSGD_LEVELS or b.q.numel() != numel:
        raise PayloadError("QSGD body needs 1..127 levels and one value per weight")
    if not 1 <= b.bucket_size <= MAX_QSGD_BUCKET:
        raise PayloadError(f"QSGD bucket size must be 1..{MAX_QSGD_BUCKET}, got {b.bucket_size}")
    if b.norms.numel() != _buckets(numel, b.bucket_size):
        raise PayloadError(
            f"QSGD body has {b.norms.numel()} norms, {numel} weights in buckets of "
            f"{b.bucket_size} need {_buckets(numel, b.bucket_size)}"
        )
    q = b.q.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if np.any(np.abs(q) > b.levels):
        raise PayloadError("QSGD values exceed the number of levels")
    mode, levels = encode_levels(q, b.levels)
    head = struct.pack("<BBI", b.levels, mode, b.bucket_size)
    return head + _floats(b.norms, FloatType.FLOAT32, "QSGD norms") + levels


def _bits(negative: torch.Tensor) -> bytes:
    return np.packbits(negative.detach().cpu().numpy().astype(bool), bitorder="little").tobytes()


_BODY_OF_CODEC: dict[Codec, type] = {
    Codec.DENSE: DenseBody,
    Codec.WEIGHTS: DenseBody,
    Codec.SYNTHETIC: SyntheticBody,
    Codec.TOPK: SparseBody,
    Codec.STC: TernaryBody,
    Codec.SIGN: SignBody,
    Codec.QSGD: QuantBody,
    Codec.BUNDLE: BundleBody,
    Codec.LOWRANK: LowRankBody,
    Codec.CORRECTED: CorrectedBody,
    Codec.CORRECTED_TAGGED: CorrectedBody,
}
# the correction's body in each corrected codec
_CORRECTIONS_OF_CODEC: dict[Codec, tuple[type, ...]] = {
    Codec.CORRECTED: (SparseBody,),
    Codec.CORRECTED_TAGGED: (SparseBody, TernaryBody),
}
# the tag of a tagged corrected body: the codec its correction would have as a payload
_CORRECTION_TAG = {SparseBody: Codec.TOPK, TernaryBody: Codec.STC}


def _encode_synthetic(b: SyntheticBody, ft: FloatType) -> bytes:
    n, dims = b.inputs.shape[0], tuple(b.inputs.shape[1:])
    if not 1 <= n <= MAX_SAMPLES or not 1 <= len(dims) <= MAX_NDIM:
        raise PayloadError(f"synthetic inputs shape {tuple(b.inputs.shape)} not encodable")
    if b.labels.ndim != 2 or b.labels.shape[0] != n or not 1 <= b.labels.shape[1] <= 65535:
        raise PayloadError(f"labels shape {tuple(b.labels.shape)} does not match {n} inputs")
    if not 1 <= math.prod(dims) <= MAX_INPUT_NUMEL:
        raise PayloadError(f"synthetic input dims {dims} out of range")
    layers = b.layer_scales
    n_layers = 0 if layers is None else layers.numel()
    if layers is not None and not 1 <= n_layers <= MAX_LAYER_SCALES:
        raise PayloadError(f"{n_layers} layer scales not encodable (1..{MAX_LAYER_SCALES})")
    head = _finite_f32(b.scale, "scale")
    head += struct.pack("<HHBxH", n, b.labels.shape[1], len(dims), n_layers)
    head += struct.pack(f"<{len(dims)}I", *dims)
    if layers is not None:
        head += _floats(layers, FloatType.FLOAT32, "layer scales")
    return head + _floats(b.inputs, ft, "inputs") + _floats(b.labels, ft, "labels")


def _encode_sparse(b: SparseBody, ft: FloatType, numel: int) -> bytes:
    k = b.indices.numel()
    if b.values.numel() != k:
        raise PayloadError("top-k values and indices differ in length")
    mode, rice, positions = encode_positions(_indices(b.indices, numel), numel)
    return struct.pack("<IBB", k, mode, rice) + _floats(b.values, ft, "values") + positions


def _encode_ternary(b: TernaryBody, numel: int) -> bytes:
    k = b.indices.numel()
    if b.negative.numel() != k:
        raise PayloadError("STC signs and indices differ in length")
    mode, rice, positions = encode_positions(_indices(b.indices, numel), numel)
    return (
        struct.pack("<I", k)
        + _finite_f32(b.magnitude, "magnitude")
        + struct.pack("<BB", mode, rice)
        + _bits(b.negative)
        + positions
    )


def _encode_body(p: Payload) -> bytes:
    b, ft = p.body, p.float_type
    if not isinstance(b, _BODY_OF_CODEC[p.codec]):
        raise PayloadError(f"codec {p.codec.name} cannot carry a {type(b).__name__}")
    if isinstance(b, DenseBody):
        if b.values.numel() != p.numel:
            raise PayloadError(f"dense body has {b.values.numel()} values, numel is {p.numel}")
        return _floats(b.values, ft, "dense values")
    if isinstance(b, SyntheticBody):
        return _encode_synthetic(b, ft)
    if isinstance(b, SparseBody):
        return _encode_sparse(b, ft, p.numel)
    if isinstance(b, CorrectedBody):
        if not isinstance(b.correction, _CORRECTIONS_OF_CODEC[p.codec]):
            raise PayloadError(
                f"codec {p.codec.name} cannot carry a {type(b.correction).__name__} correction"
            )
        synthetic = b"" if b.synthetic is None else _encode_synthetic(b.synthetic, ft)
        correction = (
            _encode_sparse(b.correction, ft, p.numel)
            if isinstance(b.correction, SparseBody)
            else _encode_ternary(b.correction, p.numel)
        )
        tag = bytes([_CORRECTION_TAG[type(b.correction)]]) if p.codec == Codec.CORRECTED_TAGGED else b""
        return struct.pack("<I", len(synthetic)) + tag + synthetic + correction
    if isinstance(b, TernaryBody):
        return _encode_ternary(b, p.numel)
    if isinstance(b, SignBody):
        if b.negative.numel() != p.numel:
            raise PayloadError("sign body must hold one sign per weight")
        return _finite_f32(b.scale, "scale") + _bits(b.negative)
    if isinstance(b, BundleBody):
        return _encode_bundle(b, p.numel)
    if isinstance(b, QuantBody):
        return _encode_qsgd(b, p.numel)
    if isinstance(b, LowRankBody):
        return encode_lowrank(b, _NP_FLOAT[ft], p.numel)
    raise PayloadError(f"unknown body type {type(b).__name__}")


def _check_bundled(inner: bytes, numel: int) -> None:
    """A bundled payload must decode, hold no bundle (checked before decoding, so nesting
    cannot recurse) and have the bundle's ``numel``."""
    if len(inner) > 6 and inner[6] == Codec.BUNDLE:
        raise PayloadError("a bundle cannot hold another bundle")
    if decode(inner).numel != numel:
        raise PayloadError("every bundled payload must have the bundle's numel")


def _encode_bundle(b: BundleBody, numel: int) -> bytes:
    if not 1 <= len(b.payloads) <= MAX_BUNDLE or len(b.weights) != len(b.payloads):
        raise PayloadError(f"a bundle holds 1..{MAX_BUNDLE} payloads, one weight each")
    parts = [struct.pack("<H", len(b.payloads))]
    for weight, inner in zip(b.weights, b.payloads, strict=True):
        if not math.isfinite(weight):
            raise PayloadError(f"bundle weight is not finite: {weight!r}")
        _check_bundled(inner, numel)
        parts.append(struct.pack("<dI", weight, len(inner)) + bytes(inner))
    return b"".join(parts)


# ------------------------------------------------------------------------------- sizes
# ``len(encode(...))`` from a payload's layout parameters, without building it: what
# budgets, byte limits and benchmarks use. They follow the layout above; a test checks
# each against ``encode`` for every codec.

_SYNTHETIC_FIXED = 4 + 2 + 2 + 1 + 1 + 2  # scale, n, n_classes, ndim, zero byte, n_layer_scales


def float_width(float_type: FloatType) -> int:
    """Bytes per float of the body's float arrays."""
    return 2 if float_type == FloatType.FLOAT16 else 4


def dense_size(numel: int, float_type: FloatType = FloatType.FLOAT32) -> int:
    """Exact size of a dense update or a full-weights payload."""
    return HEADER_SIZE + float_width(float_type) * numel


def synthetic_size(
    n: int, input_shape: Sequence[int], n_classes: int, float_type: FloatType, n_layer_scales: int = 0
) -> int:
    """Exact size of a synthetic (3SFC) payload with ``n`` samples."""
    fixed = HEADER_SIZE + _SYNTHETIC_FIXED + 4 * len(input_shape) + 4 * n_layer_scales
    return fixed + n * (math.prod(input_shape) + n_classes) * float_width(float_type)


def sparse_size(numel: int, k: int, float_type: FloatType = FloatType.FLOAT32) -> int:
    """Most bytes a top-k payload keeping ``k`` of ``numel`` entries can take (exact
    for ``k`` = 0 or ``numel``: the positions are then a bitmap or nothing)."""
    return HEADER_SIZE + 6 + float_width(float_type) * k + positions_bytes_bound(numel, k)


def ternary_size(numel: int, k: int) -> int:
    """Most bytes an STC payload keeping ``k`` of ``numel`` entries can take (exact as
    :func:`sparse_size` is)."""
    return HEADER_SIZE + 10 + (k + 7) // 8 + positions_bytes_bound(numel, k)


def sign_size(numel: int) -> int:
    """Exact size of a sign payload."""
    return HEADER_SIZE + 4 + (numel + 7) // 8


def qsgd_size(numel: int, levels: int, bucket_size: int) -> int:
    """Most bytes a QSGD payload can take: its levels packed, never exceeded (exact
    when the packed section is the one chosen)."""
    return HEADER_SIZE + 6 + 4 * _buckets(numel, bucket_size) + levels_bytes_bound(numel, levels)


def lowrank_size(layout: Sequence[tuple[int, int, int]], float_type: FloatType) -> int:
    """Exact size of a low-rank (PowerSGD) payload with these ``(rows, cols, rank)``
    records (rank 0: the block is dense)."""
    floats = sum(record_floats(*rec) for rec in layout)
    return HEADER_SIZE + 4 + LOWRANK_RECORD.size * len(layout) + float_width(float_type) * floats


def corrected_size(synthetic_bytes: int, sparse_bytes: int, codec: Codec = Codec.CORRECTED_TAGGED) -> int:
    """Size of a corrected payload (``codec``) whose synthetic and sparse parts would take
    these many bytes as payloads of their own (exact or a bound as the sparse size is)."""
    return synthetic_bytes + sparse_bytes - HEADER_SIZE + 4 + (codec == Codec.CORRECTED_TAGGED)


def bundle_size(lengths: Sequence[int]) -> int:
    """Exact size of a bundle of payloads with these encoded lengths."""
    return HEADER_SIZE + 2 + sum(12 + n for n in lengths)


def encode(payload: Payload) -> bytes:
    """Serialise ``payload``; the result's ``len()`` is what the network carries."""
    if len(payload.base_digest) != DIGEST_SIZE:
        raise PayloadError(f"base digest must be {DIGEST_SIZE} bytes")
    if not 0 <= payload.numel <= MAX_NUMEL or not 0 <= payload.server_round < 2**32:
        raise PayloadError("numel or server round out of range")
    body = _encode_body(payload)
    header = HEADER.pack(
        MAGIC,
        VERSION,
        int(payload.direction),
        int(payload.codec),
        int(payload.float_type),
        payload.server_round,
        payload.base_digest,
        payload.numel,
        len(body),
    )
    return header + body


# ---------------------------------------------------------------------------- decoding


class _Reader:
    """Bounds-checked cursor over a body; every read says what was missing."""

    def __init__(self, data: memoryview, codec: Codec, version: int = VERSION) -> None:
        self.data, self.pos, self.codec, self.version = data, 0, codec, version

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.pos + size > len(self.data):
            raise PayloadError(
                f"{self.codec.name} body too short for {what}: need {size} bytes at "
                f"offset {self.pos}, body has {len(self.data)}"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[int | float, ...]:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, what))

    def floats(self, count: int, ft: FloatType, what: str) -> torch.Tensor:
        dt = _NP_FLOAT[ft]
        arr = np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt)
        if not np.all(np.isfinite(arr)):
            raise PayloadError(f"{what} contains NaN or Inf")
        return torch.from_numpy(arr.astype(np.float32))

    def finite_f32(self, what: str) -> float:
        (value,) = self.unpack("<f", what)
        if not math.isfinite(value):
            raise PayloadError(f"{what} is not finite")
        return float(value)

    def indices(self, k: int, numel: int) -> torch.Tensor:
        arr = np.frombuffer(self.take(4 * k, "indices"), dtype="<u4").astype(np.int64)
        if k and (arr[-1] >= numel or np.any(np.diff(arr) <= 0)):
            raise PayloadError(f"indices must be strictly increasing and below numel={numel}")
        return torch.from_numpy(arr)

    def bits(self, count: int, what: str) -> torch.Tensor:
        raw = np.frombuffer(self.take((count + 7) // 8, what), dtype=np.uint8)
        unpacked = np.unpackbits(raw, bitorder="little")
        if np.any(unpacked[count:]):
            raise PayloadError(f"{what}: padding bits after the last sign are not zero")
        return torch.from_numpy(unpacked[:count].astype(bool))

    def rest(self) -> memoryview:
        """Everything left of the body (a section that runs to its end)."""
        return self.take(len(self.data) - self.pos, "the final section")

    def count(self, k: int, unit: float, what: str) -> int:
        """Reject a declared count whose data cannot fit in what is left."""
        if k * unit > len(self.data) - self.pos:
            raise PayloadError(f"declared {what}={k} needs more bytes than the body holds")
        return k


def _decode_synthetic(r: _Reader, ft: FloatType) -> SyntheticBody:
    scale = r.finite_f32("scale")
    n, n_classes, ndim, pad, n_layers = r.unpack("<HHBBH", "synthetic shape fields")
    if pad != 0:
        raise PayloadError("synthetic header padding byte is not zero")
    if n < 1 or n_classes < 1:
        raise PayloadError(f"synthetic payload needs n >= 1 and n_classes >= 1, got {n}, {n_classes}")
    if not 1 <= int(ndim) <= MAX_NDIM:
        raise PayloadError(f"synthetic input ndim must be 1..{MAX_NDIM}, got {ndim}")
    dims = [int(d) for d in r.unpack(f"<{int(ndim)}I", "input dims")]
    per_input = math.prod(dims)
    if per_input < 1 or per_input > MAX_INPUT_NUMEL:
        raise PayloadError(f"synthetic input dims {dims} out of range")
    r.count(int(n_layers), 4, "layer scales")
    layers = r.floats(int(n_layers), FloatType.FLOAT32, "layer scales") if n_layers else None
    size = _NP_FLOAT[ft].itemsize
    r.count(int(n) * (per_input + int(n_classes)), size, "synthetic values")
    inputs = r.floats(int(n) * per_input, ft, "inputs").view(int(n), *dims)
    labels = r.floats(int(n) * int(n_classes), ft, "labels").view(int(n), int(n_classes))
    return SyntheticBody(scale=scale, inputs=inputs, labels=labels, layer_scales=layers)


def _decode_topk(r: _Reader, ft: FloatType, numel: int) -> SparseBody:
    k, mode, rice = (int(x) for x in r.unpack("<IBB", "k and position mode"))
    if k > numel:
        raise PayloadError(f"top-k declares k={k} > numel={numel}")
    r.count(k, _NP_FLOAT[ft].itemsize, "k")
    values = r.floats(k, ft, "values")
    idx = decode_positions(r.rest(), mode, rice, k, numel)
    return SparseBody(indices=torch.from_numpy(idx), values=values)


def _decode_corrected(r: _Reader, ft: FloatType, numel: int) -> CorrectedBody:
    """A corrected body: a top-k correction in codec 10, the tagged one in codec 11."""
    (length,) = r.unpack("<I", "synthetic part length")
    tag = Codec.TOPK
    if r.codec == Codec.CORRECTED_TAGGED:
        (raw,) = r.unpack("<B", "correction codec")
        if raw not in _CORRECTION_TAG.values():
            raise PayloadError(
                f"correction codec {raw} is neither top-k ({Codec.TOPK:d}) nor STC ({Codec.STC:d})"
            )
        tag = Codec(int(raw))
    synthetic = None
    if length:
        part = _Reader(r.take(int(length), "synthetic part"), r.codec)
        synthetic = _decode_synthetic(part, ft)
        if part.pos != len(part.data):
            raise PayloadError(f"{len(part.data) - part.pos} trailing bytes after the synthetic part")
    correction = _decode_topk(r, ft, numel) if tag == Codec.TOPK else _decode_stc(r, numel)
    return CorrectedBody(synthetic=synthetic, correction=correction)


def _decode_stc(r: _Reader, numel: int) -> TernaryBody:
    (k,) = r.unpack("<I", "k")
    magnitude = r.finite_f32("magnitude")
    mode, rice = (int(x) for x in r.unpack("<BB", "position mode"))
    if k > numel:
        raise PayloadError(f"STC declares k={k} > numel={numel}")
    negative = r.bits(int(k), "STC signs")
    idx = decode_positions(r.rest(), mode, rice, int(k), numel)
    return TernaryBody(indices=torch.from_numpy(idx), negative=negative, magnitude=magnitude)


def _decode_qsgd(r: _Reader, numel: int) -> QuantBody:
    levels, mode, bucket = (int(x) for x in r.unpack("<BBI", "QSGD levels and bucket"))
    if not 1 <= levels <= MAX_QSGD_LEVELS:
        raise PayloadError(f"QSGD levels must be 1..{MAX_QSGD_LEVELS}, got {levels}")
    if not 1 <= bucket <= MAX_QSGD_BUCKET:
        raise PayloadError(f"QSGD bucket size must be 1..{MAX_QSGD_BUCKET}, got {bucket}")
    n_buckets = r.count(_buckets(numel, bucket), 4, "QSGD buckets")
    norms = r.floats(n_buckets, FloatType.FLOAT32, "QSGD norms")
    q = decode_levels(r.rest(), mode, levels, numel, r.version)
    return QuantBody(norms=norms, levels=levels, q=torch.from_numpy(q), bucket_size=bucket)


# v1 and v2 layouts of the codecs that v3 codes more compactly (see the module docstring)


def _decode_topk_v2(r: _Reader, ft: FloatType, numel: int) -> SparseBody:
    (k,) = r.unpack("<I", "k")
    r.count(int(k), 4 + _NP_FLOAT[ft].itemsize, "k")
    if k > numel:
        raise PayloadError(f"top-k declares k={k} > numel={numel}")
    idx = r.indices(int(k), numel)
    return SparseBody(indices=idx, values=r.floats(int(k), ft, "values"))


def _decode_stc_v2(r: _Reader, numel: int) -> TernaryBody:
    (k,) = r.unpack("<I", "k")
    magnitude = r.finite_f32("magnitude")
    r.count(int(k), 4.125, "k")
    if k > numel:
        raise PayloadError(f"STC declares k={k} > numel={numel}")
    idx = r.indices(int(k), numel)
    return TernaryBody(indices=idx, negative=r.bits(int(k), "STC signs"), magnitude=magnitude)


def _decode_qsgd_v2(r: _Reader, numel: int) -> QuantBody:
    norm = r.finite_f32("norm")
    (levels,) = r.unpack("<B", "levels")
    if not 1 <= int(levels) <= MAX_QSGD_LEVELS:
        raise PayloadError(f"QSGD levels must be 1..{MAX_QSGD_LEVELS}, got {levels}")
    q = np.frombuffer(r.take(numel, "QSGD values"), dtype="<i1")
    if np.any(np.abs(q.astype(np.int16)) > int(levels)):
        raise PayloadError("QSGD values exceed the declared number of levels")
    norms = torch.full((1 if numel else 0,), norm, dtype=torch.float32)
    q8 = torch.from_numpy(q.astype(np.int8))
    return QuantBody(norms=norms, levels=int(levels), q=q8, bucket_size=max(numel, 1))


def _decode_bundle(r: _Reader, numel: int) -> BundleBody:
    (count,) = r.unpack("<H", "bundle count")
    if count < 1:
        raise PayloadError("a bundle must hold at least one payload")
    weights, payloads = [], []
    for _ in range(int(count)):
        weight, length = r.unpack("<dI", "bundle entry header")
        if not math.isfinite(weight):
            raise PayloadError("bundle weight is not finite")
        inner = bytes(r.take(int(length), "bundled payload"))
        _check_bundled(inner, numel)
        weights.append(float(weight))
        payloads.append(inner)
    return BundleBody(tuple(weights), tuple(payloads))


_BODY_DECODERS: dict[Codec, Callable[[_Reader, FloatType, int], Body]] = {
    Codec.DENSE: lambda r, ft, n: DenseBody(r.floats(n, ft, "dense values")),
    Codec.WEIGHTS: lambda r, ft, n: DenseBody(r.floats(n, ft, "weights")),
    Codec.SYNTHETIC: lambda r, ft, n: _decode_synthetic(r, ft),
    Codec.TOPK: _decode_topk,
    Codec.STC: lambda r, ft, n: _decode_stc(r, n),
    Codec.SIGN: lambda r, ft, n: SignBody(scale=r.finite_f32("scale"), negative=r.bits(n, "signs")),
    Codec.QSGD: lambda r, ft, n: _decode_qsgd(r, n),
    Codec.BUNDLE: lambda r, ft, n: _decode_bundle(r, n),
    Codec.LOWRANK: lambda r, ft, n: decode_lowrank(r.rest(), _NP_FLOAT[ft], n),
    Codec.CORRECTED: _decode_corrected,
    Codec.CORRECTED_TAGGED: _decode_corrected,
}
_LEGACY_DECODERS: dict[Codec, Callable[[_Reader, FloatType, int], Body]] = {
    Codec.TOPK: _decode_topk_v2,
    Codec.STC: lambda r, ft, n: _decode_stc_v2(r, n),
    Codec.QSGD: lambda r, ft, n: _decode_qsgd_v2(r, n),
}


def decode(data: bytes) -> Payload:
    """Parse and validate bytes from the network.

    Raises
    ------
    PayloadError
        For any malformed input: wrong magic, unknown codec or dtype, any length that
        does not add up exactly, out-of-range counts or indices, NaN/Inf values.
    UnsupportedVersion
        For a format version not in :data:`READABLE_VERSIONS`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    if len(view) < HEADER_SIZE:
        raise PayloadError(f"payload is {len(view)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, direction, codec, ftype, rnd, digest, numel, body_len = HEADER.unpack(view[:HEADER_SIZE])
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersion(
            f"payload format version {version}, this build reads versions {READABLE_VERSIONS}"
        )
    try:
        direction_e, codec_e, ftype_e = Direction(direction), Codec(codec), FloatType(ftype)
    except ValueError as exc:
        raise PayloadError(f"bad header field: {exc}") from None
    if body_len != len(view) - HEADER_SIZE:
        raise PayloadError(
            f"header declares a {body_len}-byte body but {len(view) - HEADER_SIZE} bytes follow"
        )
    if numel > MAX_NUMEL:
        raise PayloadError(f"numel {numel} exceeds the limit {MAX_NUMEL}")
    if version < 3 and codec_e == Codec.LOWRANK:
        raise PayloadError(f"low-rank payloads do not exist in format v{version} (v3 and later)")
    if version < 4 and codec_e == Codec.CORRECTED:
        raise PayloadError(f"corrected payloads do not exist in format v{version} (v4 and later)")
    if version < 5 and codec_e == Codec.CORRECTED_TAGGED:
        raise PayloadError(f"tagged corrected payloads do not exist in format v{version} (v5 and later)")
    reader = _Reader(view[HEADER_SIZE:], codec_e, version)
    if codec_e in (Codec.DENSE, Codec.WEIGHTS):
        reader.count(numel, _NP_FLOAT[ftype_e].itemsize, "numel")
    decoders = _LEGACY_DECODERS if version < 3 and codec_e in _LEGACY_DECODERS else _BODY_DECODERS
    body = decoders[codec_e](reader, ftype_e, int(numel))
    if reader.pos != len(reader.data):
        raise PayloadError(f"{len(reader.data) - reader.pos} trailing bytes after the {codec_e.name} body")
    if version == 1 and isinstance(body, SyntheticBody) and body.layer_scales is not None:
        raise PayloadError("synthetic header padding bytes are not zero (v1 has no layer scales)")
    if version == 1 and codec_e == Codec.BUNDLE:
        raise PayloadError("bundle payloads do not exist in format v1")
    return Payload(
        codec=codec_e,
        direction=direction_e,
        server_round=int(rnd),
        base_digest=bytes(digest),
        numel=int(numel),
        body=body,
        float_type=ftype_e,
    )
