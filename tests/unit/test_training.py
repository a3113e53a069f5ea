"""Unit tests for e3sfc_core.training: learning works, runs are seeded, devices resolve."""

from __future__ import annotations

import pytest
import torch

from e3sfc_core.datasets import TensorData, load_dataset
from e3sfc_core.errors import ConfigError, DatasetError
from e3sfc_core.models import build_model
from e3sfc_core.training import TrainStats, evaluate, resolve_device, sgd_step, train_local

CPU = torch.device("cpu")
SETTINGS = {"epochs": 5, "lr": 0.05, "batch_size": 32, "device": CPU}


@pytest.fixture(scope="module")
def digits() -> tuple[TensorData, TensorData]:
    train, test, _ = load_dataset("digits", "unused")
    return train, test


def test_training_lowers_loss_and_learns_digits(digits: tuple[TensorData, TensorData]) -> None:
    train, test = digits
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    loss_before, acc_before = evaluate(model, test, device=CPU)
    stats = train_local(model, train, seed=0, momentum=0.9, **SETTINGS)
    loss_after, acc_after = evaluate(model, test, device=CPU)

    assert isinstance(stats, TrainStats)
    assert stats.num_examples == len(train)
    assert stats.seconds > 0
    assert stats.loss < loss_before
    assert loss_after < loss_before / 2
    assert acc_before < 0.3
    assert acc_after > 0.8
    assert not model.training  # evaluate switched it


def test_same_seed_gives_identical_weights(digits: tuple[TensorData, TensorData]) -> None:
    train, _ = digits
    runs = []
    for seed in (1, 1, 2):
        model = build_model("mlp", (1, 8, 8), 10, seed=0)
        loss = train_local(model, train, seed=seed, **{**SETTINGS, "epochs": 1}).loss
        runs.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss_a, a), (loss_b, b), (_, c) = runs
    assert loss_a == loss_b
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_train_leaves_global_rng_alone(digits: tuple[TensorData, TensorData]) -> None:
    train, _ = digits
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    train_local(model, train, seed=0, **{**SETTINGS, "epochs": 1})
    assert torch.equal(torch.rand(2), expected)


def test_evaluate_counts_accuracy_exactly() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity())
    x = torch.eye(3).reshape(3, 1, 1, 3)  # logits are one-hot on the diagonal
    data = TensorData(x, torch.tensor([0, 1, 0]))
    loss, acc = evaluate(model, data, device=CPU, batch_size=2)
    assert acc == pytest.approx(2 / 3)
    assert loss > 0


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"lr": 0.0}, {"batch_size": 0}, {"momentum": -0.1}])
def test_bad_hyperparameters_are_config_errors(
    digits: tuple[TensorData, TensorData], bad: dict[str, float]
) -> None:
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    with pytest.raises(ConfigError):
        train_local(model, digits[0], seed=0, **{**SETTINGS, **bad})


def test_empty_data_is_a_dataset_error() -> None:
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    empty = TensorData(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.int64))
    with pytest.raises(DatasetError):
        train_local(model, empty, seed=0, **SETTINGS)
    with pytest.raises(DatasetError):
        evaluate(model, empty, device=CPU)


def test_resolve_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == CPU
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_device("cuda")


def test_resolve_device_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")


def test_resolve_device_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="auto"):
        resolve_device("tpu")


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-3), (0.9, 1e-3)])
def test_our_sgd_step_is_torch_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    # Prepare: two copies of a model and the same batches
    ours, theirs = (build_model("lenet5", (1, 28, 28), 10, seed=3) for _ in range(2))
    gen = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)

    batches = [batch() for _ in range(4)]
    optimiser = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    params, velocity = list(ours.parameters()), {}

    # Execute: four steps each way
    for x, y in batches:
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        sgd_step(params, velocity, lr=0.05, momentum=momentum, weight_decay=weight_decay)
        optimiser.step()

    # Assert
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
