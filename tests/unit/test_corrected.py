"""3SFC with a sparse correction (e3sfc_core.corrected): sizes, the split of the payload,
what it reconstructs, and that the rest of the round logic accepts it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from e3sfc_core.compressor import Budget, CompressorSettings, PayloadMeta, build_compressor
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.corrected import CorrectedSyntheticCompressor
from e3sfc_core.datasets import get_spec, load_partition
from e3sfc_core.errors import ConfigError, PayloadRejected
from e3sfc_core.models import build_model
from e3sfc_core.payload import (
    Codec,
    CorrectedBody,
    Direction,
    SparseBody,
    SyntheticBody,
    TernaryBody,
    decode,
    dense_size,
    encode,
    synthetic_size,
)
from e3sfc_core.rounds import Expectation, check_payload, compress_update
from e3sfc_core.simulate import run_reference
from e3sfc_core.synthetic import SyntheticFeatureCompressor
from e3sfc_core.synthetic_gradient import parameter_sizes
from e3sfc_core.tensors import digest_flat, get_flat, set_flat
from e3sfc_core.training import train_local

SHAPE, CLASSES = (1, 8, 8), 10


@pytest.fixture(scope="module")
def mlp_update() -> tuple[nn.Module, torch.Tensor, PayloadMeta]:
    """A real one-epoch update of client 0 on digits, at the seed-0 MLP weights."""
    data = load_partition("digits", 0, 10, alpha=1.0, seed=0, data_root="unused")
    model = build_model("mlp", SHAPE, CLASSES, seed=0)
    base = get_flat(model)
    train_local(model, data, epochs=1, lr=0.05, batch_size=32, device=torch.device("cpu"), seed=1)
    update = get_flat(model) - base
    set_flat(model, base)
    return model, update, PayloadMeta(Direction.UPLINK, 3, digest_flat(base))


def settings(model: nn.Module, **kw: object) -> CompressorSettings:
    base = {
        "layer_count": len(parameter_sizes(model)),
        "scale_mode": "layer",
        "max_evals": 6,
        "float16": True,
        "correction_code": "float",  # the tests of the correction's values; ternary below
    }
    return CompressorSettings(**{**base, **kw})  # type: ignore[arg-type]


def corrected(model: nn.Module, share: float = 0.5, code: str = "float") -> CorrectedSyntheticCompressor:
    c = build_compressor(
        "3sfc", settings(model, correction_share=share, correction_code=code), get_spec("digits")
    )
    assert isinstance(c, CorrectedSyntheticCompressor)
    return c


def test_share_zero_is_the_papers_3sfc_and_a_share_out_of_range_is_refused() -> None:
    # Prepare
    model = build_model("mlp", SHAPE, CLASSES, seed=0)

    # Execute / Assert
    assert isinstance(
        build_compressor("3sfc", settings(model), get_spec("digits")), SyntheticFeatureCompressor
    )
    with pytest.raises(ConfigError, match="correction_share"):
        CorrectedSyntheticCompressor(settings(model, correction_share=0.995), SHAPE, CLASSES)
    with pytest.raises(ValueError, match="correction-share"):
        ExperimentConfig.from_run_config({"correction-share": 1.0})


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_the_correction_takes_its_share_of_the_payload(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta], share: float
) -> None:
    # Prepare
    model, update, meta = mlp_update
    c = corrected(model, share)
    budget = Budget(2)

    # Execute
    data = compress_update(c, update, model, meta, budget).data
    body = decode(data).body

    # Assert: the batch keeps its n samples; the correction's bytes are about share/(1-share)
    # of the batch's (the positions' length varies), and the payload never passes its bound
    assert isinstance(body, CorrectedBody) and body.synthetic.inputs.shape[0] == 2
    batch = synthetic_size(2, SHAPE, CLASSES, c.float_type, len(parameter_sizes(model)))
    correction = len(data) - batch - 5  # after the length and the correction codec tag
    assert 0.8 * share / (1 - share) <= correction / (batch - 28) <= share / (1 - share)
    assert len(data) <= c.encoded_size(update.numel(), budget)
    assert body.correction.indices.numel() == c.k(update.numel(), budget) > 0


@pytest.mark.parametrize("ratio", [20.0, 60.0])
def test_payload_ratio_grows_the_correction_to_a_share_of_the_dense_update(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta], ratio: float
) -> None:
    # Prepare: at share 0.5 a 2-sample payload is about 1/300 of the MLP's float32 update
    model, update, meta = mlp_update
    numel, budget = update.numel(), Budget(2)
    plain = corrected(model)
    floored = build_compressor(
        "3sfc", settings(model, correction_share=0.5, payload_ratio=ratio), get_spec("digits")
    )
    assert isinstance(floored, CorrectedSyntheticCompressor)

    # Execute
    data = compress_update(floored, update, model, meta, budget).data
    body = decode(data).body

    # Assert: the batch keeps its samples, the correction grows until the payload's bound
    # reaches dense / ratio (within one entry's bytes), and the payload stays within it
    goal = dense_size(numel) / ratio
    assert isinstance(body, CorrectedBody) and body.synthetic.inputs.shape[0] == 2
    assert plain.encoded_size(numel, budget) < goal
    assert goal - 8 <= floored.encoded_size(numel, budget) <= goal
    assert len(data) <= floored.encoded_size(numel, budget)
    assert body.correction.indices.numel() == floored.k(numel, budget) > plain.k(numel, budget)


def test_payload_ratio_leaves_a_payload_already_above_it_as_it_is(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta],
) -> None:
    # Prepare
    model, update, _ = mlp_update
    plain = corrected(model)
    floored = build_compressor(
        "3sfc", settings(model, correction_share=0.5, payload_ratio=1000.0), get_spec("digits")
    )

    # Execute / Assert
    numel = update.numel()
    for n in (1, 2, 4):
        assert floored.encoded_size(numel, Budget(n)) == plain.encoded_size(numel, Budget(n))


def test_the_correction_sends_the_largest_entries_the_batch_missed(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta],
) -> None:
    # Prepare
    model, update, meta = mlp_update
    c = corrected(model)

    # Execute
    enc = compress_update(c, update, model, meta, Budget(2))
    body = decode(enc.data).body
    assert isinstance(body, CorrectedBody)
    synthetic = replace(decode(enc.data), codec=Codec.SYNTHETIC, body=body.synthetic)
    missed = update - c.synthetic.decompress(synthetic, model)

    # Assert: the kept indices are the largest |missed| entries; the receiver gets the
    # batch's update plus them; the residual is what is left (zero at the kept entries,
    # up to float16 rounding)
    idx = body.correction.indices
    smallest_kept = float(missed[idx].abs().min())
    others = torch.ones_like(missed, dtype=torch.bool)
    others[idx] = False
    assert smallest_kept >= float(missed[others].abs().max())
    assert torch.equal(enc.residual, update - enc.transmitted)
    assert float(enc.residual[idx].abs().max()) <= 1e-3 * smallest_kept


def test_a_ternary_correction_sends_more_of_the_largest_entries_as_their_mean_magnitude(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta],
) -> None:
    # Prepare
    model, update, meta = mlp_update
    ternary, floats = corrected(model, code="ternary"), corrected(model)
    numel, budget = update.numel(), Budget(2)

    # Execute
    enc = compress_update(ternary, update, model, meta, budget)
    p = decode(enc.data)
    body = p.body
    assert isinstance(body, CorrectedBody) and isinstance(body.correction, TernaryBody)
    missed = update - ternary.synthetic.decompress(
        replace(p, codec=Codec.SYNTHETIC, body=body.synthetic), model
    )

    # Assert: the codec says ternary; in the same bound it keeps about 3x the entries of
    # the float16 code (2 + ~1 bits of position and sign against 16 + ~1 bits); they are
    # the largest |missed| entries, sent as their mean magnitude with their signs
    idx = body.correction.indices
    mu = float(missed[idx].abs().mean())
    assert p.codec == Codec.CORRECTED_TAGGED == ternary.codec
    assert abs(ternary.encoded_size(numel, budget) - floats.encoded_size(numel, budget)) <= 8
    assert idx.numel() == ternary.k(numel, budget) >= 2.5 * floats.k(numel, budget)
    others = torch.ones_like(missed, dtype=torch.bool)
    others[idx] = False
    assert float(missed[idx].abs().min()) >= float(missed[others].abs().max())
    assert body.correction.magnitude == pytest.approx(mu, rel=1e-6)
    assert torch.equal(body.correction.negative, missed[idx] < 0)
    assert torch.equal(enc.residual, update - enc.transmitted)


def test_an_unknown_correction_code_is_refused() -> None:
    # Prepare
    model = build_model("mlp", SHAPE, CLASSES, seed=0)

    # Execute / Assert
    with pytest.raises(ConfigError, match="correction_code"):
        CorrectedSyntheticCompressor(
            settings(model, correction_share=0.5, correction_code="int8"), SHAPE, CLASSES
        )
    with pytest.raises(ValueError, match="correction-code"):
        ExperimentConfig.from_run_config({"correction-code": "int8"})


def test_the_correction_lowers_the_residual_of_the_batch_alone(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta],
) -> None:
    # Prepare: the same search (seed, evaluations, samples) with and without a correction
    model, update, meta = mlp_update
    plain = SyntheticFeatureCompressor(settings(model), SHAPE, CLASSES)

    # Execute
    alone = compress_update(plain, update, model, meta, Budget(2))
    both = compress_update(corrected(model), update, model, meta, Budget(2))

    # Assert
    assert both.residual_ratio < alone.residual_ratio
    assert both.cosine > alone.cosine


def test_the_server_checks_the_sample_count_inside_a_corrected_payload(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta],
) -> None:
    # Prepare
    model, update, meta = mlp_update
    c = corrected(model)
    data = compress_update(c, update, model, meta, Budget(2)).data
    rules = Expectation(
        Direction.UPLINK, 3, meta.base_digest, Codec.CORRECTED_TAGGED, update.numel(), len(data), 2
    )

    # Execute / Assert
    assert isinstance(check_payload(data, rules).body, CorrectedBody)
    with pytest.raises(PayloadRejected, match="synthetic samples"):
        check_payload(data, replace(rules, max_samples=1))


def test_decompress_refuses_another_codec(mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta]) -> None:
    # Prepare
    model, update, meta = mlp_update
    c = corrected(model)
    plain = decode(encode(c.synthetic.compress(update, model, meta, Budget(1))[0]))
    assert isinstance(plain.body, SyntheticBody)

    # Execute / Assert
    with pytest.raises(PayloadRejected, match="CORRECTED"):
        c.decompress(plain, model)
    wrong = replace(
        plain,
        codec=Codec.CORRECTED_TAGGED,
        body=CorrectedBody(plain.body, SparseBody(torch.tensor([0]), torch.ones(1))),
        numel=5,
    )
    with pytest.raises(PayloadRejected, match="numel"):
        c.decompress(wrong, model)


def test_a_corrected_run_learns_and_both_sides_agree(tmp_path: object) -> None:
    # Prepare: 3 rounds, every downlink compressed, so clients must reproduce it exactly
    cfg = ExperimentConfig.from_run_config(
        {
            "num-rounds": 3,
            "synthetic-samples": 2,
            "correction-share": 0.75,
            "max-evals": 4,
            "downlink": "compressed",
            "num-threads": 1,
            "output-dir": str(tmp_path),
        }
    )

    # Execute
    exp, summary = run_reference(cfg)

    # Assert: no client desynced; the accuracy is far above chance (10%) after 3 rounds;
    # each round reports how many payloads carried a batch (on the MLP most do)
    records = exp.server.records
    assert all(r.desynced == 0 for r in records)
    assert summary["final_accuracy"] > 0.5
    assert all(0 <= r.uplink_batches <= r.accepted and r.downlink_batch in (0, 1) for r in records)
    assert sum(r.uplink_batches for r in records) > sum(r.accepted for r in records) / 2


def test_a_sparse_target_goes_without_the_batch_in_the_same_bytes(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta],
) -> None:
    # Prepare: a target that is exactly 40 nonzero entries (a batch's dense gradient
    # cannot beat sending them all), and a real update (where the batch wins)
    model, update, meta = mlp_update
    c = corrected(model)
    spiky = torch.zeros_like(update)
    spiky[torch.arange(40) * 1000] = torch.linspace(1.0, 2.0, 40)
    numel, budget = update.numel(), Budget(2)

    # Execute
    sparse_only = compress_update(c, spiky, model, meta, budget)
    real = compress_update(c, update, model, meta, budget)

    # Assert: the spiky target is sent by Top-k alone (more entries than next to a batch),
    # within the same bound, and its residual is (nearly) zero; the real one keeps its batch
    alone, both = decode(sparse_only.data).body, decode(real.data).body
    assert isinstance(alone, CorrectedBody) and isinstance(both, CorrectedBody)
    assert alone.synthetic is None and both.synthetic is not None
    assert c.k_alone(numel, budget) > c.k(numel, budget)
    assert alone.correction.indices.numel() == c.k_alone(numel, budget)
    assert len(sparse_only.data) <= c.encoded_size(numel, budget)
    assert sparse_only.residual_ratio < 1e-3


def test_a_batch_below_the_minimum_cosine_is_not_sent(
    mlp_update: tuple[nn.Module, torch.Tensor, PayloadMeta],
) -> None:
    # Prepare: the real update, whose batch is sent with no minimum (previous test)
    model, update, meta = mlp_update
    strict = CorrectedSyntheticCompressor(
        settings(model, correction_share=0.5, batch_min_cosine=1.0), SHAPE, CLASSES
    )

    # Execute
    enc = compress_update(strict, update, model, meta, Budget(2))

    # Assert: no batch reaches cosine 1, so the Top-k goes alone, in the same bytes
    body = decode(enc.data).body
    assert isinstance(body, CorrectedBody) and body.synthetic is None
    assert body.correction.indices.numel() == strict.k_alone(update.numel(), Budget(2))
