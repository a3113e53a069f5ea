"""3SFC with a sparse correction: a synthetic batch plus the Top-k of what it missed.

A few synthetic samples cannot express every direction of a convolutional network's
update (|cos| about 0.5 inside the ConvNet's convolutions, ``bench/results/
one_round_digits_convnet_layers.md``). Error feedback then keeps those directions back
round after round: the residual grows in them until it dominates the target and the
synthetic search chases stale error (the cosine falls from 0.65 to 0.2 over a run).
Sending, next to the batch, the largest entries of ``target - synthetic update`` gives
every coordinate a way out: a coordinate the batch cannot express grows in the residual
until it is among the largest, as under Top-k, so the residual stays bounded while the
batch still carries the dense part of the update for a few hundred bytes.

``correction_share`` is the share of the payload's bytes given to the correction; the
batch keeps its ``n`` samples, so a payload is ``synthetic bytes / (1 - share)``. The
batch's bytes depend on the input size, not on the model, so on a large model that
payload is a vanishing fraction of the update (ResNet-18: about 1/7,000 of its float32
weights, where nothing learns): ``payload_ratio`` > 0 grows the correction until a
payload is at least ``dense float32 bytes / payload_ratio``. Where a
batch explains less than the Top-k entries its bytes would buy (it can, on conv nets),
the payload carries the sparse part alone, in the same bytes: each round sends whichever
of the two leaves the smaller residual, so error feedback contracts at least as fast as
under either.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from .baselines import TopKCompressor
from .compressor import Budget, CompressorSettings, CompressStats, PayloadMeta, checked_body
from .errors import ConfigError
from .payload import (
    HEADER_SIZE,
    Codec,
    CorrectedBody,
    Payload,
    SparseBody,
    SyntheticBody,
    corrected_size,
    dense_size,
)
from .synthetic import SyntheticFeatureCompressor
from .tensors import cosine

MAX_CORRECTION_SHARE = 0.99
NO_BATCH = corrected_size(HEADER_SIZE, 0)  # what a payload without a batch adds to its sparse part


class CorrectedSyntheticCompressor:
    """3SFC's batch plus a Top-k correction of its error, in one payload."""

    name = "3sfc-corrected"
    codec = Codec.CORRECTED
    uses_error_feedback = True

    def __init__(self, settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int) -> None:
        share = settings.correction_share
        if not 0.0 < share <= MAX_CORRECTION_SHARE:
            raise ConfigError(f"correction_share must be in (0, {MAX_CORRECTION_SHARE}], got {share!r}")
        self.share = float(share)
        self.min_cosine = float(settings.batch_min_cosine)
        self.ratio = float(settings.payload_ratio)
        self.synthetic = SyntheticFeatureCompressor(settings, input_shape, n_classes)
        self.sparse = TopKCompressor(settings)
        self.float_type = self.synthetic.float_type

    def k(self, numel: int, budget: Budget) -> int:
        """Entries the correction keeps next to the batch: as many as fit in its share."""
        synthetic = self.synthetic.encoded_size(numel, budget)
        correction_body = int((synthetic - HEADER_SIZE) * self.share / (1.0 - self.share))
        if self.ratio > 0:
            floor = int(dense_size(numel) / self.ratio)  # the whole payload's least size
            correction_body = max(correction_body, floor - corrected_size(synthetic, HEADER_SIZE))
        return self.sparse.k_for_bytes(numel, HEADER_SIZE + correction_body)

    def k_alone(self, numel: int, budget: Budget) -> int:
        """Entries a payload without the batch keeps in the same bytes."""
        return self.sparse.k_for_bytes(numel, self.encoded_size(numel, budget) - NO_BATCH)

    def encoded_size(self, numel: int, budget: Budget) -> int:
        """Most bytes a payload can take (the positions' code length varies)."""
        sparse = self.sparse.size_for_k(numel, self.k(numel, budget))
        return corrected_size(self.synthetic.encoded_size(numel, budget), sparse)

    def compress(
        self, target: torch.Tensor, model: nn.Module, meta: PayloadMeta, budget: Budget
    ) -> tuple[Payload, CompressStats]:
        """Search the batch and keep the largest entries of what it does not reproduce;
        send that, or the sparse part alone in the same bytes if it leaves less behind."""
        start = time.perf_counter()
        target = target.to(torch.float32)
        synthetic, stats = self.synthetic.compress(target, model, meta, budget)
        missed = target - self.synthetic.decompress(synthetic, model).to(target.device)
        numel = target.numel()
        with_batch = self.sparse.keep(missed, self.k(numel, budget))
        alone = self.sparse.keep(target, self.k_alone(numel, budget))
        batch: SyntheticBody | None = synthetic.body  # type: ignore[assignment]
        correction = with_batch
        weak = cosine(target - missed, target) < self.min_cosine
        if weak or _left(target, alone) < _left(missed, with_batch):
            batch, correction = None, alone
        payload = Payload(
            codec=self.codec,
            direction=meta.direction,
            server_round=meta.server_round,
            base_digest=meta.base_digest,
            numel=numel,
            body=CorrectedBody(synthetic=batch, correction=correction),
            float_type=self.float_type,
        )
        return payload, CompressStats(time.perf_counter() - start, stats.evaluations, stats.degenerate)

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        """The batch's update (if any) plus the sparse correction."""
        body = checked_body(payload, self.codec, CorrectedBody, model)
        update = self.sparse.decompress(replace(payload, codec=Codec.TOPK, body=body.correction), model)
        if body.synthetic is not None:
            synthetic = replace(payload, codec=Codec.SYNTHETIC, body=body.synthetic)
            update = self.synthetic.decompress(synthetic, model).to(update.device) + update
        return update


def _left(values: torch.Tensor, sent: SparseBody) -> float:
    """Squared norm of what stays behind after ``sent`` replaces its entries of ``values``."""
    idx = sent.indices.to(values.device)
    kept = values[idx] - sent.values.to(values.device)
    rest = float(values.pow(2).sum()) - float(values[idx].pow(2).sum())
    return rest + float(kept.pow(2).sum())
