"""The pieces of one round that both sides share: compress with error feedback, validate
and decompress a received payload, aggregate, and bring a model up to a target digest.

``compress_update`` is where the error-feedback rule lives: the residual subtracts what
the receiver reconstructs from the *encoded bytes*, so wire rounding (float16) never
escapes the residual: ``target == transmitted + residual`` holds exactly. Both sides
reconstruct with :func:`exact_decompress` (CPU, one thread), so "what the receiver
reconstructs" is the same bits on the sender and the receiver whatever devices and
thread counts they train with: the identity holds across processes and devices, given
the same torch build on the same CPU instruction set (a different build or CPU may round
differently; for the downlink a digest mismatch then triggers a full re-sync).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .compressor import Budget, Compressor, CompressStats, PayloadMeta
from .errors import BaseModelMismatch, DesyncError, PayloadRejected
from .payload import (
    BundleBody,
    Codec,
    CorrectedBody,
    DenseBody,
    Direction,
    Payload,
    SyntheticBody,
    decode,
    encode,
)
from .tensors import add_flat_, cosine, digest_flat, get_flat, num_params, set_flat


@dataclass(frozen=True)
class EncodedUpdate:
    """One compressed update: the bytes that travel and what they decode to."""

    data: bytes
    transmitted: torch.Tensor
    residual: torch.Tensor
    cosine: float
    residual_ratio: float
    stats: CompressStats
    decoded: Payload  # ``decode(data)``, as the receiver will see it


def compress_update(
    compressor: Compressor,
    target: torch.Tensor,
    model: nn.Module,
    meta: PayloadMeta,
    budget: Budget,
) -> EncodedUpdate:
    """Compress ``target`` (update + old residual) and compute the new residual.

    The model must be at the base weights named in ``meta``. The residual is zero for
    methods without error feedback (FedAvg, QSGD). The update is reconstructed with
    :func:`exact_decompress`, as every receiver does, so the server's new weights are
    bit-identical to the clients' and each residual subtracts exactly what was applied.
    """
    payload, stats = compressor.compress(target, model, meta, budget)
    data = encode(payload)
    decoded = decode(data)
    transmitted = exact_decompress(compressor, decoded, model).to(target.device)
    if compressor.uses_error_feedback:
        residual = target - transmitted
    else:
        residual = torch.zeros_like(target)
    t_norm = float(target.norm())
    ratio = float(residual.norm()) / t_norm if t_norm > 0 else 0.0
    return EncodedUpdate(data, transmitted, residual, abs(cosine(transmitted, target)), ratio, stats, decoded)


def bounded_residual(residual: torch.Tensor, update: torch.Tensor, cap: float) -> torch.Tensor:
    """The error-feedback memory scaled down to at most ``cap`` times the fresh update's
    norm (``cap`` 0 leaves it alone).

    Error feedback assumes the compressor eventually sends what it keeps back. 3SFC
    cannot express every direction at the current weights, so the memory grows in those
    directions until the target is mostly stale error (residual ratio near 1). Bounding it
    is an option, not the default: measured, it cost the digits MLP 3 to 9 points and did
    not rescue the ConvNet (``bench/results/archive/diag_mlp_a1.md``, ``diag_convnet_a1.md``).
    What the bound removes is forgotten, as a decaying memory forgets.
    """
    if cap <= 0:
        return residual
    r_norm, bound = float(residual.norm()), cap * float(update.norm())
    if r_norm <= bound or r_norm == 0.0:
        return residual
    return residual * (bound / r_norm)


@dataclass(frozen=True)
class Expectation:
    """What a valid payload must look like in this round (the server's rules)."""

    direction: Direction
    server_round: int
    base_digest: bytes
    codec: Codec
    numel: int
    max_bytes: int
    max_samples: int | None = None


def check_payload(data: bytes, expect: Expectation) -> Payload:
    """Decode and check a received payload against this round's rules.

    Raises
    ------
    PayloadError
        Malformed bytes (from :func:`decode`) or a payload that breaks a rule:
        :class:`PayloadRejected` for size, direction, round, codec, numel or sample
        count, :class:`BaseModelMismatch` for a payload made at other weights.
    """
    if len(data) > expect.max_bytes:
        raise PayloadRejected(f"payload is {len(data)} bytes, this round allows {expect.max_bytes}")
    p = decode(data)
    if p.direction != expect.direction:
        raise PayloadRejected(f"payload direction {p.direction.name}, expected {expect.direction.name}")
    if p.server_round != expect.server_round:
        raise PayloadRejected(f"payload is for round {p.server_round}, this is round {expect.server_round}")
    if p.codec != expect.codec:
        raise PayloadRejected(f"payload codec {p.codec.name}, this run uses {expect.codec.name}")
    if p.numel != expect.numel:
        raise PayloadRejected(f"payload numel {p.numel}, the model has {expect.numel} weights")
    if p.base_digest != expect.base_digest:
        raise BaseModelMismatch(
            f"payload base digest {p.base_digest.hex()} != global model {expect.base_digest.hex()}"
        )
    body = p.body.synthetic if isinstance(p.body, CorrectedBody) else p.body
    if expect.max_samples is not None and isinstance(body, SyntheticBody):
        if body.inputs.shape[0] > expect.max_samples:
            raise PayloadRejected(
                f"payload has {body.inputs.shape[0]} synthetic samples, budget allows {expect.max_samples}"
            )
    return p


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def exact_decompress(compressor: Compressor, payload: Payload, model: nn.Module) -> torch.Tensor:
    """Decompress on the CPU with one thread, returning a CPU tensor.

    Sender and receiver must decompress to the same bits: downlink updates, or the
    digests part ways; uplink updates, or the client's residual subtracts something other
    than what the server applied (1 vs 2 CPU threads already differ by 4e-8 relative on
    the ConvNet; TF32 on a GPU by far more). Multi-threaded and GPU kernels may sum in a
    different order from process to process, a single-threaded CPU pass does not. A
    caller decompressing many payloads on a GPU model passes a CPU copy once.
    """
    cpu_model = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    with _one_thread():
        return decompress_checked(compressor, payload, cpu_model).cpu()


def decompress_checked(compressor: Compressor, payload: Payload, model: nn.Module) -> torch.Tensor:
    """Decompress and reject a non-finite result (it would poison the global model)."""
    update = compressor.decompress(payload, model)
    if not torch.isfinite(update).all():
        raise PayloadRejected("decompressed update contains NaN or Inf")
    return update


def aggregation_multipliers(
    updates: Sequence[torch.Tensor], weights: Sequence[float], clip_factor: float
) -> tuple[list[float], list[float]]:
    """Each update's factor in the example-weighted mean, its norm first clipped to
    ``clip_factor`` x the round's median norm (0: no clipping).

    Clipping relative to the round's median norm bounds what one abusive client can do
    without a dataset-specific absolute threshold. Returns the factors and each update's
    clip scale (1.0 where it was not clipped): the server tells each client its scale, so
    that error feedback keeps what clipping held back (``ClientState.residual_for``).
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(weights))
    factors = [w / total for w in weights]
    scales = [1.0] * len(updates)
    if clip_factor > 0 and len(updates) > 1:
        norms = torch.stack([u.norm() for u in updates])
        bound = float(norms.median()) * clip_factor
        for i, n in enumerate(norms.tolist()):
            if n > bound > 0:
                scales[i] = bound / n
                factors[i] *= scales[i]
    return factors, scales


def weighted_sum(updates: Sequence[torch.Tensor], factors: Sequence[float]) -> torch.Tensor:
    """``sum_i factors[i] * updates[i]`` in order (the order fixes the float rounding)."""
    total: torch.Tensor | None = None
    for u, f in zip(updates, factors, strict=True):
        total = u * f if total is None else total + u * f
    if total is None:
        raise ValueError("no updates to sum")
    return total


def clip_and_average(
    updates: Sequence[torch.Tensor], weights: Sequence[float], clip_factor: float
) -> tuple[torch.Tensor, int]:
    """Example-weighted mean with median-relative clipping (see :func:`aggregation_multipliers`);
    returns the mean and how many updates were clipped."""
    factors, scales = aggregation_multipliers(updates, weights, clip_factor)
    return weighted_sum(updates, factors), sum(1 for s in scales if s < 1.0)


def bundle_update(compressor: Compressor, body: BundleBody, model: nn.Module) -> torch.Tensor:
    """Decompress a bundle (a relayed downlink): the weighted sum of its payloads, each
    reconstructed with :func:`exact_decompress` at the model's weights, as a CPU tensor.
    Sender and receivers run this same function on the same bytes, so they agree bit for bit."""
    cpu_model = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    parts = [exact_decompress(compressor, decode(inner), cpu_model) for inner in body.payloads]
    return weighted_sum(parts, body.weights)


def apply_downlink(
    model: nn.Module, payloads: Sequence[bytes], compressor: Compressor, target_digest: bytes
) -> int:
    """Bring ``model`` to the weights with ``target_digest`` using downlink payloads.

    Payloads are replayed in order, each at the weights it was made for: the first one
    whose base digest matches the current weights starts the replay (a client that is
    further ahead than the server thinks skips what it already has). A ``WEIGHTS``
    payload replaces the weights outright. Returns how many payloads were applied.

    Raises
    ------
    DesyncError
        The weights cannot be brought to ``target_digest`` with these payloads.
    PayloadError
        A payload is malformed.
    """
    applied = 0
    digest = digest_flat(get_flat(model))
    for data in payloads:
        if digest == target_digest:
            break
        p = decode(data)
        if p.direction != Direction.DOWNLINK or p.numel != num_params(model):
            raise PayloadRejected("not a downlink payload for this model")
        if p.codec == Codec.WEIGHTS:
            assert isinstance(p.body, DenseBody)
            set_flat(model, p.body.values)
        elif p.base_digest != digest:
            continue
        elif p.codec == Codec.DENSE:
            assert isinstance(p.body, DenseBody)
            add_flat_(model, p.body.values)
        elif p.codec == Codec.BUNDLE:
            assert isinstance(p.body, BundleBody)
            add_flat_(model, bundle_update(compressor, p.body, model))
        else:
            add_flat_(model, exact_decompress(compressor, p, model))
        applied += 1
        digest = digest_flat(get_flat(model))
    if digest != target_digest:
        raise DesyncError(
            f"after {applied} downlink payload(s) the model digest is {digest.hex()}, "
            f"the server's is {target_digest.hex()}"
        )
    return applied
