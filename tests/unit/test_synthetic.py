"""3SFC compressor and decompressor on the digits MLP with a real local-training update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from e3sfc_core import synthetic
from e3sfc_core.compressor import COMPRESSORS, Budget, CompressorSettings, PayloadMeta
from e3sfc_core.datasets import load_partition
from e3sfc_core.errors import PayloadRejected
from e3sfc_core.models import build_model
from e3sfc_core.payload import (
    HEADER_SIZE,
    Codec,
    DenseBody,
    Direction,
    FloatType,
    Payload,
    SyntheticBody,
    decode,
    encode,
)
from e3sfc_core.rounds import compress_update
from e3sfc_core.synthetic import SyntheticFeatureCompressor
from e3sfc_core.synthetic_gradient import synthesize_update, synthetic_gradient
from e3sfc_core.tensors import cosine, digest_flat, get_flat, num_params, set_flat
from e3sfc_core.training import train_local

SHAPE, CLASSES = (1, 8, 8), 10
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Setup:
    model: nn.Module  # at the base weights, eval mode
    base: torch.Tensor
    update: torch.Tensor
    meta: PayloadMeta


@pytest.fixture(scope="module")
def setup() -> Setup:
    """Digits MLP at seed-0 weights and one epoch of SGD on client 0's partition."""
    data = load_partition("digits", 0, 10, alpha=1.0, seed=0, data_root="unused")
    model = build_model("mlp", SHAPE, CLASSES, seed=0)
    base = get_flat(model)
    train_local(model, data, epochs=1, lr=0.05, batch_size=32, device=CPU, seed=1)
    update = get_flat(model) - base
    set_flat(model, base)
    model.eval()
    assert float(update.norm()) > 0
    return Setup(model, base, update, PayloadMeta(Direction.UPLINK, 4, digest_flat(base)))


def comp(**kw: object) -> SyntheticFeatureCompressor:
    return SyntheticFeatureCompressor(CompressorSettings(**kw), SHAPE, CLASSES)  # type: ignore[arg-type]


def test_registered_as_3sfc() -> None:
    # Execute
    c = COMPRESSORS["3sfc"](CompressorSettings(), SHAPE, CLASSES)

    # Assert
    assert isinstance(c, SyntheticFeatureCompressor)
    assert (c.codec, c.uses_error_feedback) == (Codec.SYNTHETIC, True)


def test_cosine_reaches_threshold_and_grows_with_samples(setup: Setup) -> None:
    # Prepare
    c = comp(seed=3)

    # Execute
    one = compress_update(c, setup.update, setup.model, setup.meta, Budget(1))
    four = compress_update(c, setup.update, setup.model, setup.meta, Budget(4))

    # Assert
    assert one.cosine >= 0.3
    assert four.cosine > one.cosine
    # the reported cosine is the one of what the receiver reconstructs
    torch.testing.assert_close(one.cosine, abs(cosine(one.transmitted, setup.update)))
    assert 1 <= one.stats.evaluations <= CompressorSettings().max_evals


def test_transmitted_is_projection_of_target(setup: Setup) -> None:
    # Prepare
    c = comp(seed=5)

    # Execute
    enc = compress_update(c, setup.update, setup.model, setup.meta, Budget(2))

    # Assert: the closed-form scale makes the residual orthogonal to what was sent
    t, u, r = setup.update.double(), enc.transmitted.double(), enc.residual.double()
    assert abs(float(torch.dot(r, u))) <= 1e-4 * float(t.norm() * u.norm())
    torch.testing.assert_close(enc.residual_ratio, math.sqrt(1 - enc.cosine**2), rtol=1e-4, atol=1e-6)


def test_same_seed_gives_identical_bytes(setup: Setup) -> None:
    # Prepare
    a, b = comp(seed=11), comp(seed=11)

    # Execute
    pa, _ = a.compress(setup.update, setup.model, setup.meta, Budget(2))
    pb, _ = b.compress(setup.update.clone(), setup.model, setup.meta, Budget(2))
    pc, _ = comp(seed=12).compress(setup.update, setup.model, setup.meta, Budget(2))

    # Assert
    assert encode(pa) == encode(pb)
    assert not torch.equal(pa.body.inputs, pc.body.inputs)  # type: ignore[union-attr]


def test_compress_leaves_the_weights_alone(setup: Setup) -> None:
    # Prepare
    digest = digest_flat(get_flat(setup.model))

    # Execute
    comp(seed=1).compress(setup.update, setup.model, setup.meta, Budget(1))

    # Assert
    assert digest_flat(get_flat(setup.model)) == digest == setup.meta.base_digest


@pytest.mark.parametrize("float16", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_encoded_size_is_exact(setup: Setup, float16: bool, n: int) -> None:
    # Prepare
    c = comp(seed=2, float16=float16, max_evals=3)

    # Execute
    payload, _ = c.compress(setup.update, setup.model, setup.meta, Budget(n))
    data = encode(payload)

    # Assert
    assert c.encoded_size(setup.update.numel(), Budget(n)) == len(data)
    assert payload.body.inputs.shape == (n, *SHAPE)  # type: ignore[union-attr]
    assert payload.body.labels.shape == (n, CLASSES)  # type: ignore[union-attr]
    assert payload.float_type == (FloatType.FLOAT16 if float16 else FloatType.FLOAT32)
    assert (payload.numel, payload.server_round, payload.base_digest) == (
        num_params(setup.model),
        setup.meta.server_round,
        setup.meta.base_digest,
    )


@pytest.mark.parametrize("n", [1, 4, 16])
def test_float16_halves_the_float_part(n: int) -> None:
    # Prepare
    fixed = HEADER_SIZE + 12 + 4 * len(SHAPE)
    floats = n * (math.prod(SHAPE) + CLASSES)

    # Execute
    s32 = comp().encoded_size(1000, Budget(n))
    s16 = comp(float16=True).encoded_size(1000, Budget(n))

    # Assert
    assert s32 - fixed == 4 * floats
    assert s16 - fixed == 2 * floats


@pytest.mark.parametrize("float16", [False, True])
def test_error_feedback_invariant(setup: Setup, float16: bool) -> None:
    # Prepare: a target that already carries an old residual
    g = torch.Generator().manual_seed(9)
    old_residual = torch.randn(setup.update.numel(), generator=g) * 1e-3
    target = setup.update + old_residual
    c = comp(seed=4, float16=float16)

    # Execute
    enc = compress_update(c, target, setup.model, setup.meta, Budget(2))
    server_model = build_model("mlp", SHAPE, CLASSES, seed=0)
    set_flat(server_model, setup.base)
    decoded = decode(enc.data)
    server_side = c.decompress(decoded, server_model)

    # Assert
    assert torch.equal(enc.residual, target - enc.transmitted)
    torch.testing.assert_close(enc.transmitted + enc.residual, target, rtol=1e-6, atol=1e-9)
    # the residual subtracts exactly what another process reconstructs from the bytes
    torch.testing.assert_close(server_side, enc.transmitted, rtol=0, atol=0)
    if float16:
        body = decoded.body
        assert isinstance(body, SyntheticBody)
        torch.testing.assert_close(body.inputs, body.inputs.half().float(), rtol=0, atol=0)
        torch.testing.assert_close(body.labels, body.labels.half().float(), rtol=0, atol=0)


def test_zero_target_gives_zero_scale(setup: Setup) -> None:
    # Prepare
    zero = torch.zeros_like(setup.update)

    # Execute
    enc = compress_update(comp(), zero, setup.model, setup.meta, Budget(1))
    payload = decode(enc.data)

    # Assert
    assert isinstance(payload.body, SyntheticBody)
    assert payload.body.scale == 0.0
    assert not enc.stats.degenerate
    assert enc.stats.evaluations == 0
    assert torch.count_nonzero(enc.transmitted) == 0
    assert torch.count_nonzero(enc.residual) == 0
    assert enc.residual_ratio == 0.0


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_degenerate_scale_sends_zero_update(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    # Prepare: the synthetic gradient used for the scale is all zeros (scale 0/0) or non-finite
    real = synthetic.synthesize_update
    monkeypatch.setattr(
        synthetic, "synthesize_update", lambda m, x, y, s, *_: torch.full((num_params(m),), bad)
    )
    c = comp(seed=1, max_evals=3)

    # Execute
    payload, stats = c.compress(setup.update, setup.model, setup.meta, Budget(1))
    monkeypatch.setattr(synthetic, "synthesize_update", real)
    data = encode(payload)
    update = c.decompress(decode(data), setup.model)

    # Assert
    assert stats.degenerate
    assert payload.body.scale == 0.0  # type: ignore[union-attr]
    assert torch.count_nonzero(update) == 0


def test_degenerate_compress_update_keeps_target_in_residual(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(synthetic, "synthesize_update", lambda m, x, y, s, *_: torch.zeros(num_params(m)))

    # Execute
    enc = compress_update(comp(max_evals=3), setup.update, setup.model, setup.meta, Budget(1))

    # Assert
    assert enc.stats.degenerate
    assert torch.count_nonzero(enc.transmitted) == 0
    torch.testing.assert_close(enc.residual, setup.update, rtol=0, atol=0)


def _payload(setup: Setup, **changes: object) -> Payload:
    g = torch.Generator().manual_seed(0)
    fields: dict[str, object] = {
        "codec": Codec.SYNTHETIC,
        "direction": Direction.UPLINK,
        "server_round": 4,
        "base_digest": setup.meta.base_digest,
        "numel": num_params(setup.model),
        "body": SyntheticBody(0.5, torch.randn(1, *SHAPE, generator=g), torch.randn(1, CLASSES, generator=g)),
    }
    fields.update(changes)
    return Payload(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "case",
    ["dense-codec", "dense-body", "numel", "input-shape", "input-ndim", "classes"],
)
def test_decompress_rejects_mismatched_payloads(setup: Setup, case: str) -> None:
    # Prepare
    g = torch.Generator().manual_seed(1)
    numel = num_params(setup.model)
    changes: dict[str, object] = {
        "dense-codec": {"codec": Codec.DENSE, "body": DenseBody(torch.zeros(numel))},
        "dense-body": {"body": DenseBody(torch.zeros(numel))},
        "numel": {"numel": numel + 1},
        "input-shape": {
            "body": SyntheticBody(1.0, torch.randn(1, 1, 4, 16, generator=g), torch.randn(1, CLASSES))
        },
        "input-ndim": {"body": SyntheticBody(1.0, torch.randn(1, 64, generator=g), torch.randn(1, CLASSES))},
        "classes": {"body": SyntheticBody(1.0, torch.randn(1, *SHAPE, generator=g), torch.randn(1, 9))},
    }[case]
    p = _payload(setup, **changes)

    # Execute / Assert
    with pytest.raises(PayloadRejected):
        comp().decompress(p, setup.model)


def test_decompress_is_linear_in_scale(setup: Setup) -> None:
    # Prepare
    p = _payload(setup)
    body = p.body
    assert isinstance(body, SyntheticBody)
    doubled = _payload(setup, body=SyntheticBody(2 * body.scale, body.inputs, body.labels))
    negated = _payload(setup, body=SyntheticBody(-body.scale, body.inputs, body.labels))

    # Execute
    u1 = comp().decompress(p, setup.model)
    u2 = comp().decompress(doubled, setup.model)
    un = comp().decompress(negated, setup.model)

    # Assert
    torch.testing.assert_close(u2, 2 * u1, rtol=0, atol=0)
    torch.testing.assert_close(un, -u1, rtol=0, atol=0)
    assert float(u1.norm()) > 0


def test_decompress_is_scale_times_soft_label_gradient(setup: Setup) -> None:
    # Prepare: an independent gradient of CE with soft targets, computed by hand
    p = _payload(setup)
    body = p.body
    assert isinstance(body, SyntheticBody)
    model = setup.model
    logits = model(body.inputs)
    loss = -(body.labels * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = body.scale * torch.cat([g.reshape(-1) for g in grads])

    # Execute
    got = comp().decompress(p, model)

    # Assert
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_synthesize_update_restores_train_mode_and_detaches(setup: Setup) -> None:
    # Prepare
    model = build_model("mlp", SHAPE, CLASSES, seed=0)
    model.train()
    x, y = torch.randn(2, *SHAPE), torch.randn(2, CLASSES)

    # Execute
    u = synthesize_update(model, x, y, 1.5)

    # Assert
    assert model.training
    assert not u.requires_grad
    torch.testing.assert_close(u, 1.5 * synthetic_gradient(model, x, y), rtol=0, atol=0)


# --------------------------------------------------------------- search stopping rules


def test_cap_is_never_exceeded(setup: Setup) -> None:
    # Prepare: no stall rule, so only the cap can stop the search
    c = comp(seed=6, max_evals=7, min_improvement=0.0)

    # Execute
    _, stats = c.compress(setup.update, setup.model, setup.meta, Budget(2))

    # Assert: SciPy's line search may ask for more; the objective refuses
    assert stats.evaluations == 7


def test_stall_rule_stops_after_the_window(setup: Setup) -> None:
    # Prepare: an improvement of 1.0 in |cos| over 3 evaluations is impossible
    c = comp(seed=6, max_evals=50, stall_window=3, min_improvement=1.0)

    # Execute
    _, stats = c.compress(setup.update, setup.model, setup.meta, Budget(2))

    # Assert
    assert stats.evaluations == 4


def test_init_scale_scales_the_starting_inputs(setup: Setup) -> None:
    # Prepare: with one evaluation the best iterate is the starting point
    small, large = comp(seed=8, max_evals=1, init_scale=0.25), comp(seed=8, max_evals=1, init_scale=1.0)

    # Execute
    ps, _ = small.compress(setup.update, setup.model, setup.meta, Budget(3))
    pl, _ = large.compress(setup.update, setup.model, setup.meta, Budget(3))

    # Assert: same seeded draw, inputs scaled, labels unchanged
    assert isinstance(ps.body, SyntheticBody) and isinstance(pl.body, SyntheticBody)
    torch.testing.assert_close(ps.body.inputs * 4, pl.body.inputs, rtol=0, atol=0)
    torch.testing.assert_close(ps.body.labels, pl.body.labels, rtol=0, atol=0)


def test_diverging_search_keeps_the_best_finite_iterate(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: from the 4th evaluation on, the gradient blows up to NaN
    real = synthetic.synthetic_gradient
    calls = {"n": 0}

    def flaky(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> torch.Tensor:
        calls["n"] += 1
        g = real(model, x, y, **kw)
        return g * float("nan") if calls["n"] >= 4 else g

    monkeypatch.setattr(synthetic, "synthetic_gradient", flaky)
    c = comp(seed=6, max_evals=20, min_improvement=0.0)

    # Execute
    payload, stats = c.compress(setup.update, setup.model, setup.meta, Budget(2))
    monkeypatch.setattr(synthetic, "synthetic_gradient", real)
    enc_cos = abs(cosine(c.decompress(payload, setup.model), setup.update))

    # Assert: the search stopped at the first NaN and sent a finite, useful payload
    assert stats.evaluations == 4
    assert not stats.degenerate
    assert enc_cos > 0.05
