"""The size functions next to ``encode`` (e3sfc_core.payload): for every codec they give
``len(encode(p))`` from the layout parameters alone, exactly, or as the upper bound that
budgets need for the variable-length codes (reached when the layout is fixed)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from e3sfc_core.lowrank import LowRankBody
from e3sfc_core.payload import (
    HEADER_SIZE,
    BundleBody,
    Codec,
    CorrectedBody,
    DenseBody,
    Payload,
    QuantBody,
    SignBody,
    SparseBody,
    SyntheticBody,
    TernaryBody,
    bundle_size,
    corrected_size,
    dense_size,
    encode,
    lowrank_size,
    qsgd_size,
    sign_size,
    sparse_size,
    synthetic_size,
    ternary_size,
)

from .test_payload import golden_payloads, make

EXACT = {Codec.DENSE, Codec.WEIGHTS, Codec.SYNTHETIC, Codec.SIGN, Codec.BUNDLE, Codec.LOWRANK}


def size_of(p: Payload) -> int:
    """What the size function of ``p``'s codec says, from its layout parameters."""
    b, n = p.body, p.numel
    if isinstance(b, DenseBody):
        return dense_size(n, p.float_type)
    if isinstance(b, CorrectedBody):
        batch = HEADER_SIZE if b.synthetic is None else size_of(replace(p, body=b.synthetic))
        return corrected_size(batch, size_of(replace(p, body=b.correction)), p.codec)
    if isinstance(b, SyntheticBody):
        layers = 0 if b.layer_scales is None else b.layer_scales.numel()
        shape = tuple(b.inputs.shape[1:])
        return synthetic_size(b.inputs.shape[0], shape, b.labels.shape[1], p.float_type, layers)
    if isinstance(b, SparseBody):
        return sparse_size(n, b.indices.numel(), p.float_type)
    if isinstance(b, TernaryBody):
        return ternary_size(n, b.indices.numel())
    if isinstance(b, SignBody):
        return sign_size(n)
    if isinstance(b, QuantBody):
        return qsgd_size(n, b.levels, b.bucket_size)
    if isinstance(b, LowRankBody):
        return lowrank_size(b.layout, p.float_type)
    assert isinstance(b, BundleBody)
    return bundle_size([len(x) for x in b.payloads])


@pytest.mark.parametrize("name", sorted(golden_payloads()))
def test_size_functions_match_encode_for_every_codec(name: str) -> None:
    # Prepare
    p = golden_payloads()[name]
    # Execute
    size, actual = size_of(p), len(encode(p))
    # Assert: exact for fixed layouts, a bound for the variable-length codes
    if p.codec in EXACT:
        assert size == actual
    else:
        assert actual <= size


@pytest.mark.parametrize("k", [0, 10])
def test_sparse_and_ternary_bounds_are_reached_with_nothing_or_everything_kept(k: int) -> None:
    # Prepare: k = 0 (no positions) or k = numel (a full bitmap): no variable part
    idx = torch.arange(k)
    topk = make(Codec.TOPK, SparseBody(indices=idx, values=torch.ones(k)), 10)
    signs = torch.zeros(k, dtype=torch.bool)
    stc = make(Codec.STC, TernaryBody(indices=idx, negative=signs, magnitude=1.0), 10)
    # Execute / Assert
    assert len(encode(topk)) == sparse_size(10, k)
    assert len(encode(stc)) == ternary_size(10, k)


def test_qsgd_bound_is_reached_when_its_levels_are_packed() -> None:
    # Prepare: every level nonzero, so packing beats the gamma code
    q = torch.tensor([1, -2, 3, -4, 4, -3, 2, -1] * 4, dtype=torch.int8)
    p = make(Codec.QSGD, QuantBody(norms=torch.tensor([1.0, 2.0, 3.0]), levels=4, q=q, bucket_size=12), 32)
    # Execute / Assert
    assert len(encode(p)) == qsgd_size(32, 4, 12)
