"""Unit tests for e3sfc_core.datasets: digits, partitions, and the torchvision readers.

The torchvision datasets cannot be downloaded here, so each test writes a tiny fake copy
in the real on-disk format into ``tmp_path`` and loads it through ``load_dataset``:

* MNIST / FashionMNIST / EMNIST: torchvision 0.29 reads the *unpacked* idx files from
  ``<root>/<Class>/raw/`` and only checks that they exist (md5 is checked on download only).
* CIFAR-10/100: torchvision reads the pickled batches but checks their md5 against the real
  files on every load, which fabricated files cannot match. Those tests replace only that
  check (``torchvision.datasets.cifar.check_integrity``) with a file-exists check.
"""

from __future__ import annotations

import os
import pickle  # noqa: TID251 - CIFAR's real on-disk format is pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_digits

from e3sfc_core import datasets
from e3sfc_core.datasets import (
    DATASETS,
    TensorData,
    dirichlet_partition,
    iid_partition,
    load_dataset,
    load_partition,
    load_test,
    partition_indices,
)
from e3sfc_core.errors import ConfigError, DatasetError

N_TRAIN, N_TEST = 40, 16


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    datasets.clear_cache()
    yield
    datasets.clear_cache()


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    train, _, _ = load_dataset("digits", "unused")
    return train.y.numpy()


# --------------------------------------------------------------------------- digits


def test_digits_loads_offline_with_a_stratified_80_20_split() -> None:
    train, test, spec = load_dataset("digits", "/nonexistent")
    assert spec.input_shape == (1, 8, 8) and spec.n_classes == 10
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    assert set(test.y.tolist()) == set(range(10))
    assert torch.allclose(train.x.mean(), torch.tensor(0.0), atol=1e-5)
    assert torch.allclose(train.x.std(correction=0), torch.tensor(1.0), atol=1e-4)


def test_digits_train_and_test_are_disjoint_and_cover_everything() -> None:
    train, test, _ = load_dataset("digits", "/nonexistent")
    raw_train = datasets._read_digits(Path("."), False).x_train
    mean, std = raw_train.mean(), raw_train.std(correction=0)
    both = torch.cat([train.x, test.x]) * std + mean
    recovered = np.rint(both.reshape(len(both), -1).numpy() * 16).astype(int)
    original = load_digits().images.reshape(1797, -1).astype(int)
    # Same multiset of rows (with 1797 in total) means each sample is in exactly one split.
    assert np.array_equal(recovered[np.lexsort(recovered.T)], original[np.lexsort(original.T)])


def test_digits_split_is_the_same_every_time() -> None:
    a_train, _, _ = load_dataset("digits", "/a")
    datasets.clear_cache()
    b_train, _, _ = load_dataset("digits", "/a")
    assert a_train is not b_train
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_train.y, b_train.y)


def test_load_dataset_is_cached_per_process() -> None:
    first = load_dataset("digits", "/x")
    assert load_dataset("digits", "/x")[0] is first[0]


def test_unknown_dataset_is_a_config_error_listing_names() -> None:
    with pytest.raises(ConfigError, match="cifar100"):
        load_dataset("imagenet", "/x")


# --------------------------------------------------------------------------- partitions


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == n
    assert np.array_equal(np.sort(merged), np.arange(n))


def _mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=10).astype(float)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0, float("inf")])
@pytest.mark.parametrize("num_partitions", [10, 100])
def test_partitions_cover_every_index_once_and_none_is_empty(
    digits_labels: np.ndarray, alpha: float, num_partitions: int
) -> None:
    parts = partition_indices(digits_labels, num_partitions, alpha, seed=0)
    assert len(parts) == num_partitions
    _assert_exact_cover(parts, len(digits_labels))
    assert min(len(p) for p in parts) >= 1
    assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize("alpha", [0.3, float("inf")])
def test_partitions_are_deterministic_in_seed(digits_labels: np.ndarray, alpha: float) -> None:
    a = partition_indices(digits_labels, 10, alpha, seed=7)
    b = partition_indices(digits_labels, 10, alpha, seed=7)
    c = partition_indices(digits_labels, 10, alpha, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_small_alpha_skews_labels_more_than_large_alpha(digits_labels: np.ndarray) -> None:
    skewed = dirichlet_partition(digits_labels, 10, alpha=0.1, seed=0)
    mild = dirichlet_partition(digits_labels, 10, alpha=100.0, seed=0)
    iid = iid_partition(len(digits_labels), 10, seed=0)
    h_skewed = _mean_label_entropy(skewed, digits_labels)
    h_mild = _mean_label_entropy(mild, digits_labels)
    assert h_skewed < h_mild - 0.5
    assert abs(h_mild - _mean_label_entropy(iid, digits_labels)) < 0.1


def test_dirichlet_repair_honours_min_size() -> None:
    labels = np.repeat(np.arange(5), 20)  # 100 samples, 5 classes
    parts = dirichlet_partition(labels, 20, alpha=0.01, seed=1, min_size=4)
    _assert_exact_cover(parts, 100)
    assert min(len(p) for p in parts) >= 4


def test_iid_partition_sizes_are_balanced() -> None:
    parts = iid_partition(103, 10, seed=0)
    _assert_exact_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_non_positive_alpha_is_a_config_error(digits_labels: np.ndarray, alpha: float) -> None:
    with pytest.raises(ConfigError):
        partition_indices(digits_labels, 10, alpha, seed=0)


def test_more_partitions_than_samples_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ConfigError):
        dirichlet_partition(np.zeros(5, dtype=int), 6, alpha=1.0, seed=0)


def test_load_partition_slices_the_training_set(tmp_path: Path) -> None:
    train, _, _ = load_dataset("digits", tmp_path)
    parts = [load_partition("digits", i, 5, alpha=0.5, seed=3, data_root=tmp_path) for i in range(5)]
    assert sum(len(p) for p in parts) == len(train)
    expected = partition_indices(train.y.numpy(), 5, 0.5, seed=3)
    for part, idx in zip(parts, expected, strict=True):
        assert isinstance(part, TensorData)
        assert torch.equal(part.y, train.y[torch.from_numpy(idx)])
        assert torch.equal(part.x, train.x[torch.from_numpy(idx)])
    assert load_test("digits", tmp_path) is load_dataset("digits", tmp_path)[1]


@pytest.mark.parametrize("partition_id", [-1, 5])
def test_partition_id_out_of_range_is_a_config_error(tmp_path: Path, partition_id: int) -> None:
    with pytest.raises(ConfigError):
        load_partition("digits", partition_id, 5, alpha=1.0, seed=0, data_root=tmp_path)


# --------------------------------------------------------------------------- torchvision


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Big-endian idx file of unsigned bytes: magic 0x0000_08_<ndim>, then the dims."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_split(rng: np.random.Generator, n: int, shape: tuple[int, ...], n_classes: int):
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = np.arange(n) * (n_classes - 1) // (n - 1)  # spans 0 .. n_classes - 1
    return images, labels


def _write_mnist_like(root: Path, folder: str, prefixes: tuple[str, str], n_classes: int):
    rng = np.random.default_rng(0)
    splits = {}
    for prefix, n in zip(prefixes, (N_TRAIN, N_TEST), strict=True):
        images, labels = _fake_split(rng, n, (28, 28), n_classes)
        _write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = (images[:, None].astype(np.float32) / 255.0, labels)
    train, test = (splits[p] for p in prefixes)
    return train, test


def _write_cifar(root: Path, name: str, n_classes: int):
    rng = np.random.default_rng(1)
    train_x, train_y = _fake_split(rng, N_TRAIN, (3 * 32 * 32,), n_classes)
    test_x, test_y = _fake_split(rng, N_TEST, (3 * 32 * 32,), n_classes)
    if name == "cifar10":
        folder, label_key = root / "cifar-10-batches-py", "labels"
        chunks = np.array_split(np.arange(N_TRAIN), 5)
        files = {f"data_batch_{i + 1}": idx for i, idx in enumerate(chunks)}
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
        test_name = "test_batch"
    else:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        files = {"train": np.arange(N_TRAIN)}
        meta_name = "meta"
        meta = {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"k{i}" for i in range(20)],
        }
        test_name = "test"
    folder.mkdir(parents=True)

    def dump(file: str, x: np.ndarray, y: np.ndarray) -> None:
        entry = {"data": x, label_key: y.tolist(), "batch_label": file}
        if label_key == "fine_labels":
            entry["coarse_labels"] = (y % 20).tolist()
        (folder / file).write_bytes(pickle.dumps(entry))

    for file, idx in files.items():
        dump(file, train_x[idx], train_y[idx])
    dump(test_name, test_x, test_y)
    (folder / meta_name).write_bytes(pickle.dumps(meta))
    as_images = lambda x: x.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0  # noqa: E731
    return (as_images(train_x), train_y), (as_images(test_x), test_y)


def _writer(name: str):
    writers = {
        "mnist": lambda r: _write_mnist_like(r, "MNIST", ("train", "t10k"), 10),
        "fmnist": lambda r: _write_mnist_like(r, "FashionMNIST", ("train", "t10k"), 10),
        "emnist": lambda r: _write_mnist_like(
            r, "EMNIST", ("emnist-balanced-train", "emnist-balanced-test"), 47
        ),
        "cifar10": lambda r: _write_cifar(r, "cifar10", 10),
        "cifar100": lambda r: _write_cifar(r, "cifar100", 100),
    }
    return writers[name]


@pytest.fixture
def no_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fabricated CIFAR files cannot match the real md5: check existence only."""
    monkeypatch.setattr(
        torchvision.datasets.cifar,
        "check_integrity",
        lambda fpath, md5=None: os.path.isfile(fpath),
    )


TORCHVISION_NAMES = ["mnist", "fmnist", "emnist", "cifar10", "cifar100"]


@pytest.mark.usefixtures("no_cifar_md5")
@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_dataset_loads_from_real_file_formats(tmp_path: Path, name: str) -> None:
    (raw_train_x, raw_train_y), (raw_test_x, raw_test_y) = _writer(name)(tmp_path)
    train, test, spec = load_dataset(name, tmp_path, download=False)

    assert spec == DATASETS[name].spec
    assert train.x.shape == (N_TRAIN, *spec.input_shape)
    assert test.x.shape == (N_TEST, *spec.input_shape)
    assert train.x.dtype == test.x.dtype == torch.float32
    assert train.y.dtype == test.y.dtype == torch.int64
    assert np.array_equal(train.y.numpy(), raw_train_y)
    assert np.array_equal(test.y.numpy(), raw_test_y)
    assert int(test.y.min()) == 0 and int(test.y.max()) == spec.n_classes - 1

    # Per-channel normalisation with *training* statistics, applied to both splits.
    mean = raw_train_x.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = raw_train_x.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    channel_mean = train.x.double().mean(dim=(0, 2, 3))
    channel_std = train.x.double().std(dim=(0, 2, 3), correction=0)
    assert torch.allclose(channel_mean, torch.zeros_like(channel_mean), atol=1e-5)
    assert torch.allclose(channel_std, torch.ones_like(channel_std), atol=1e-4)
    np.testing.assert_allclose(train.x.numpy(), (raw_train_x - mean) / std, atol=1e-4)
    np.testing.assert_allclose(test.x.numpy(), (raw_test_x - mean) / std, atol=1e-4)


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_missing_files_raise_dataset_error_naming_the_path(tmp_path: Path, name: str) -> None:
    root = tmp_path / "empty-root"
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root, download=False)
    message = str(info.value)
    assert str(root) in message
    assert "data-root" in message and "download" in message


def test_wrong_image_shape_is_a_dataset_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(
            tmp_path / "MNIST/raw" / f"{prefix}-images-idx3-ubyte",
            rng.integers(0, 256, size=(4, 20, 20)),
        )
        _write_idx(tmp_path / "MNIST/raw" / f"{prefix}-labels-idx1-ubyte", np.arange(4))
    with pytest.raises(DatasetError, match="shape"):
        load_dataset("mnist", tmp_path)
