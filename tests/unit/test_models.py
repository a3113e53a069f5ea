"""Unit tests for e3sfc_core.models: shapes, no buffers, seeded init, double backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from e3sfc_core.errors import ConfigError
from e3sfc_core.models import MODELS, build_model, group_norm

SHAPES = [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 100)]
EXPECTED_NAMES = {"mlp", "convnet", "lenet5", "resnet18", "vgg11", "regnetx_200mf"}


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


def test_registry_has_the_documented_names() -> None:
    assert set(MODELS) == EXPECTED_NAMES


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
@pytest.mark.parametrize(("shape", "n_classes"), SHAPES)
def test_builds_runs_and_has_no_buffers(name: str, shape: tuple[int, int, int], n_classes: int) -> None:
    model = build_model(name, shape, n_classes, seed=0)
    assert list(model.buffers()) == []
    assert model.training  # returned as constructed; callers switch modes
    with torch.no_grad():
        out = model(torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (2, n_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_same_seed_same_weights_other_seed_different(name: str) -> None:
    a = build_model(name, (1, 8, 8), 10, seed=3)
    b = build_model(name, (1, 8, 8), 10, seed=3)
    c = build_model(name, (1, 8, 8), 10, seed=4)
    assert _params_equal(a, b)
    assert not _params_equal(a, c)


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("convnet", (1, 8, 8), 10, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(ConfigError, match="mlp") as info:
        build_model("resnet1000", (1, 8, 8), 10, seed=0)
    assert "regnetx_200mf" in str(info.value)


@pytest.mark.parametrize("shape", [(8, 8), (0, 8, 8)])
def test_bad_input_shape_is_a_config_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError):
        build_model("mlp", shape, 10, seed=0)


def test_mnist_mlp_has_199210_weights() -> None:
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 199_210


@pytest.mark.parametrize("channels", [24, 56, 128, 152, 368, 3])
def test_group_norm_groups_divide_channels(channels: int) -> None:
    norm = group_norm(channels)
    assert channels % norm.num_groups == 0
    assert norm.num_groups <= 32


@pytest.mark.parametrize("name", ["mlp", "convnet", "lenet5"])
def test_double_backward_reaches_the_input(name: str) -> None:
    """3SFC optimises synthetic inputs through the parameter gradient: d/dx f(dL/dW)."""
    model = build_model(name, (1, 8, 8), 10, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=gen, requires_grad=True)
    y = torch.randint(0, 10, (4,), generator=gen)
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    target = [torch.randn(p.shape, generator=gen) for p in params]
    mismatch = sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))
    mismatch.backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
