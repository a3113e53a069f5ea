"""3SFC with a sparse correction: a synthetic batch plus the largest entries of what it missed.

A few synthetic samples cannot express every direction of a convolutional network's
update (|cos| about 0.5 inside the ConvNet's convolutions, ``bench/results/
archive/one_round_digits_convnet_layers.md``). Error feedback then keeps those directions back
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

``correction_code`` is how the correction's entries travel: ``"ternary"`` as STC sends
them (Sattler et al. 2019: positions, one sign each and their mean magnitude),
``"float"`` with their values, ``"auto"`` (the default) whichever of the two leaves the
smaller residual in each payload (the tagged codec says which). In the same bytes
ternary keeps about 3x the entries, and error feedback carries each entry's lost
magnitude to the next round: on the digits ConvNet at equal bytes STC alone reached
94.8% against Top-k's 89.5%. But one magnitude for the whole update fits a model whose
layers' magnitudes differ widely badly (RegNetX: 62.7% ternary, 84.7% float), hence the
per-payload choice (``bench/results/model_matrix.md``).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from .baselines import STCCompressor, TopKCompressor
from .compressor import Budget, CompressorSettings, CompressStats, PayloadMeta, checked_body
from .errors import ConfigError
from .payload import (
    HEADER_SIZE,
    Codec,
    CorrectedBody,
    Payload,
    SparseBody,
    SyntheticBody,
    TernaryBody,
    corrected_size,
    dense_size,
)
from .synthetic import SyntheticFeatureCompressor
from .tensors import cosine

MAX_CORRECTION_SHARE = 0.99
NO_BATCH = corrected_size(HEADER_SIZE, 0)  # what a payload without a batch adds to its sparse part


# the codes each ``correction_code`` may send: "auto" tries both per payload
CORRECTIONS: dict[str, tuple[type[TopKCompressor], ...]] = {
    "auto": (STCCompressor, TopKCompressor),
    "ternary": (STCCompressor,),
    "float": (TopKCompressor,),
}


class CorrectedSyntheticCompressor:
    """3SFC's batch plus a sparse correction of its error, in one payload."""

    name = "3sfc-corrected"
    codec = Codec.CORRECTED_TAGGED
    uses_error_feedback = True

    def __init__(self, settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int) -> None:
        share = settings.correction_share
        if not 0.0 < share <= MAX_CORRECTION_SHARE:
            raise ConfigError(f"correction_share must be in (0, {MAX_CORRECTION_SHARE}], got {share!r}")
        if settings.correction_code not in CORRECTIONS:
            raise ConfigError(
                f"correction_code must be one of {sorted(CORRECTIONS)}, got {settings.correction_code!r}"
            )
        self.share = float(share)
        self.min_cosine = float(settings.batch_min_cosine)
        self.ratio = float(settings.payload_ratio)
        self.synthetic = SyntheticFeatureCompressor(settings, input_shape, n_classes)
        self.codes = [code(settings) for code in CORRECTIONS[settings.correction_code]]
        self.sparse = self.codes[0]
        # the receiver reads either code, whatever it sends itself
        self._readers = {SparseBody: TopKCompressor(settings), TernaryBody: STCCompressor(settings)}
        self.float_type = self.synthetic.float_type

    def code_for(self, correction: SparseBody | TernaryBody) -> TopKCompressor:
        """The code that reads (and sizes) ``correction``: Top-k values or STC signs."""
        return self._readers[type(correction)]

    def _correction_bytes(self, numel: int, budget: Budget) -> int:
        """Bytes the correction next to a batch may take, counted as a payload of its own."""
        synthetic = self.synthetic.encoded_size(numel, budget)
        body = int((synthetic - HEADER_SIZE) * self.share / (1.0 - self.share))
        if self.ratio > 0:
            floor = int(dense_size(numel) / self.ratio)  # the whole payload's least size
            body = max(body, floor - corrected_size(synthetic, HEADER_SIZE))
        return HEADER_SIZE + body

    def k(self, numel: int, budget: Budget, code: TopKCompressor | None = None) -> int:
        """Entries the correction keeps next to the batch: as many as fit in its share."""
        return (code or self.sparse).k_for_bytes(numel, self._correction_bytes(numel, budget))

    def k_alone(self, numel: int, budget: Budget, code: TopKCompressor | None = None) -> int:
        """Entries a payload without the batch keeps in the same bytes."""
        return (code or self.sparse).k_for_bytes(numel, self.encoded_size(numel, budget) - NO_BATCH)

    def encoded_size(self, numel: int, budget: Budget) -> int:
        """Most bytes a payload can take (the positions' code length varies)."""
        synthetic = self.synthetic.encoded_size(numel, budget)
        return max(
            corrected_size(synthetic, c.size_for_k(numel, self.k(numel, budget, c))) for c in self.codes
        )

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
        weak = cosine(target - missed, target) < self.min_cosine
        # (what stays behind, batch or None, correction): the batch first, so it wins ties
        options: list[tuple[float, SyntheticBody | None, SparseBody | TernaryBody]] = []
        for code in self.codes:
            if not weak:
                with_batch = code.keep(missed, self.k(numel, budget, code))
                options.append((_left(missed, with_batch, code), synthetic.body, with_batch))  # type: ignore[arg-type]
            alone = code.keep(target, self.k_alone(numel, budget, code))
            options.append((_left(target, alone, code), None, alone))
        _, batch, correction = min(options, key=lambda option: option[0])
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
        reader = self.code_for(body.correction)
        update = reader.decompress(replace(payload, codec=reader.codec, body=body.correction), model)
        if body.synthetic is not None:
            synthetic = replace(payload, codec=Codec.SYNTHETIC, body=body.synthetic)
            update = self.synthetic.decompress(synthetic, model).to(update.device) + update
        return update


def _left(values: torch.Tensor, sent: SparseBody | TernaryBody, code: TopKCompressor) -> float:
    """Squared norm of what stays behind after ``sent`` (in ``code``) replaces its entries
    of ``values``."""
    idx = sent.indices.to(values.device)
    kept = values[idx] - code.sent_values(sent, values.device)  # type: ignore[arg-type]
    rest = float(values.pow(2).sum()) - float(values[idx].pow(2).sum())
    return rest + float(kept.pow(2).sum())
