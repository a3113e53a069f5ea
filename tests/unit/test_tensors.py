"""Flat weight vectors, cosine similarity and the weights digest (e3sfc_core.tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from e3sfc_core.tensors import (
    DIGEST_SIZE,
    add_flat_,
    cosine,
    digest_flat,
    get_flat,
    num_params,
    set_flat,
    weights_digest,
)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))  # 16 + 10 = 26 weights


def test_num_params_and_flat_order_follow_parameters() -> None:
    # Prepare
    model = tiny()

    # Execute
    flat = get_flat(model)

    # Assert
    assert num_params(model) == 26 == flat.numel()
    assert flat.dtype == torch.float32
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat, expected, rtol=0, atol=0)


def test_get_flat_is_a_detached_copy() -> None:
    # Prepare
    model = tiny()
    flat = get_flat(model)
    original = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    # Execute
    flat.add_(1.0)

    # Assert
    assert not flat.requires_grad
    torch.testing.assert_close(get_flat(model), original, rtol=0, atol=0)


def test_set_flat_get_flat_round_trip() -> None:
    # Prepare
    model = tiny(0)
    values = torch.arange(26, dtype=torch.float32) / 7 - 1

    # Execute
    set_flat(model, values)

    # Assert
    torch.testing.assert_close(get_flat(model), values, rtol=0, atol=0)
    torch.testing.assert_close(model[0].weight.detach(), values[:12].view(4, 3), rtol=0, atol=0)
    torch.testing.assert_close(model[2].bias.detach(), values[-2:], rtol=0, atol=0)


def test_set_flat_between_models_makes_them_identical() -> None:
    # Prepare
    a, b = tiny(1), tiny(2)

    # Execute
    set_flat(b, get_flat(a))

    # Assert
    assert weights_digest(a) == weights_digest(b)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_set_flat_rejects_a_longer_vector() -> None:
    # Prepare
    model = tiny()

    # Execute / Assert
    with pytest.raises(ValueError, match="27"):
        set_flat(model, torch.zeros(27))


@pytest.mark.parametrize("length", [25, 27])
def test_set_flat_wrong_length_is_value_error_and_leaves_model_alone(length: int) -> None:
    # Prepare
    model = tiny()
    before = get_flat(model)

    # Execute
    with pytest.raises(ValueError):
        set_flat(model, torch.full((length,), 5.0))

    # Assert
    torch.testing.assert_close(get_flat(model), before, rtol=0, atol=0)


def test_add_flat_adds_in_place() -> None:
    # Prepare
    model = tiny()
    before = get_flat(model)
    update = torch.linspace(-1, 1, 26)

    # Execute
    add_flat_(model, update)

    # Assert
    torch.testing.assert_close(get_flat(model), before + update, rtol=0, atol=0)


def test_add_flat_zero_keeps_digest() -> None:
    # Prepare
    model = tiny()
    digest = weights_digest(model)

    # Execute
    add_flat_(model, torch.zeros(26))

    # Assert
    assert weights_digest(model) == digest


def test_cosine_of_zero_vector_is_zero() -> None:
    # Prepare
    a, zero = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)

    # Execute / Assert
    assert cosine(a, zero) == 0.0
    assert cosine(zero, a) == 0.0
    assert cosine(zero, zero) == 0.0
    assert cosine(a * 1e-14, a) == 0.0  # below eps counts as zero


def test_cosine_parallel_antiparallel_orthogonal() -> None:
    # Prepare
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1000, generator=g)
    b = torch.randn(1000, generator=g)
    b = b - torch.dot(a, b) / torch.dot(a, a) * a  # orthogonal to a

    # Execute
    par, anti, orth = cosine(a, 3.5 * a), cosine(a, -0.01 * a), cosine(a, b)

    # Assert
    torch.testing.assert_close(par, 1.0, rtol=0, atol=1e-6)
    torch.testing.assert_close(anti, -1.0, rtol=0, atol=1e-6)
    torch.testing.assert_close(orth, 0.0, rtol=0, atol=1e-5)
    assert isinstance(par, float)


def test_cosine_matches_numpy_and_is_bounded() -> None:
    # Prepare
    rng = np.random.default_rng(5)
    cases = [rng.standard_normal(50).astype(np.float32) * s for s in (1e-3, 1.0, 1e3)]

    for x in cases:
        y = (x + rng.standard_normal(50).astype(np.float32) * np.abs(x).mean()).astype(np.float32)
        # Execute
        got = cosine(torch.from_numpy(x), torch.from_numpy(y))
        # Assert
        want = float(
            np.dot(x.astype(np.float64), y) / (np.linalg.norm(x.astype(np.float64)) * np.linalg.norm(y))
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert -1.0 - 1e-6 <= got <= 1.0 + 1e-6


def test_cosine_ignores_shape() -> None:
    # Prepare
    a = torch.arange(6, dtype=torch.float32)

    # Execute / Assert
    torch.testing.assert_close(cosine(a.view(2, 3), a + 1), cosine(a, a + 1))


def test_digest_is_stable_and_sized() -> None:
    # Prepare
    flat = torch.linspace(-3, 3, 101)

    # Execute
    d1, d2, d3 = digest_flat(flat), digest_flat(flat.clone()), digest_flat(flat.double())

    # Assert
    assert len(d1) == DIGEST_SIZE == 8
    assert d1 == d2 == d3  # float64 input is digested as its float32 value


def test_digest_known_value() -> None:
    # Prepare: SHA-256 of the float32 LE bytes of [1.0, -2.0], first 8 bytes
    import hashlib

    expected = hashlib.sha256(np.array([1.0, -2.0], dtype="<f4").tobytes()).digest()[:8]

    # Execute / Assert
    assert digest_flat(torch.tensor([1.0, -2.0])) == expected


def test_digest_changes_with_a_single_ulp() -> None:
    # Prepare
    model = tiny()
    before = weights_digest(model)
    flat = get_flat(model)
    bumped = flat.clone()
    bumped[17] = torch.nextafter(flat[17], torch.tensor(float("inf")))
    assert not torch.equal(bumped, flat)

    # Execute
    set_flat(model, bumped)
    after = weights_digest(model)
    set_flat(model, flat)

    # Assert
    assert after != before
    assert weights_digest(model) == before


def test_digest_distinguishes_signed_zero_and_order() -> None:
    # Prepare
    a = torch.tensor([0.0, 1.0])

    # Execute / Assert
    assert digest_flat(a) != digest_flat(torch.tensor([-0.0, 1.0]))
    assert digest_flat(a) != digest_flat(torch.tensor([1.0, 0.0]))
