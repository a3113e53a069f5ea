"""Datasets as in-memory tensors, and the federated partitions clients train on.

Every dataset is read once per process (scikit-learn for ``digits``, torchvision's own
dataset classes for the rest), turned into float32 ``[N, C, H, W]`` images in [0, 1] and
then normalised per channel with the *training* set's mean and std (the test set uses the
same statistics). Labels are int64. Training code indexes these tensors directly, which is
much faster than going through ``torch.utils.data.Dataset`` objects and PIL.

Partitions are computed from the training labels only, so every process that asks for the
same ``(dataset, num_partitions, alpha, seed)`` gets the same split without talking to
anyone: ``alpha = inf`` is IID, a finite ``alpha > 0`` is label-skewed Dirichlet(alpha).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

DIGITS_SPLIT_SEED = 0  # fixed so that every process sees the same digits train/test split
DIGITS_TEST_FRACTION = 0.2
DIGITS_MAX_VALUE = 16.0  # load_digits pixels are integers in 0..16
PIXEL_MAX = 255.0
STD_FLOOR = 1e-8
DIRICHLET_RESAMPLES = 10


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset: ``input_shape = (C, H, W)`` and classes."""

    name: str
    input_shape: tuple[int, int, int]
    n_classes: int


@dataclass(frozen=True)
class TensorData:
    """Images ``x`` ([N, C, H, W] float32) and labels ``y`` ([N] int64), indexable by tensor.

    Loaded data is cached and shared within a process: treat the tensors as read-only.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DatasetError(f"{self.x.shape[0]} images but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray | Tensor) -> TensorData:
        """A copy holding only the rows at ``indices`` (a client's partition, say)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return TensorData(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class _Raw:
    """Un-normalised splits: images float32 in [0, 1], labels int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


Reader = Callable[[Path, bool], _Raw]


@dataclass(frozen=True)
class DatasetSource:
    """Registry entry: the spec, how to read the raw data, and where it lives under the root."""

    spec: DatasetSpec
    read: Reader
    location: str  # sub-folder of data-root that holds the files, for error messages


def _read_digits(_root: Path, _download: bool) -> _Raw:
    """scikit-learn's bundled 8x8 digits (no files needed), split 80/20 stratified."""
    from sklearn.datasets import load_digits  # imported here: only digits runs need it
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / DIGITS_MAX_VALUE
    x_tr, x_te, y_tr, y_te = train_test_split(
        images,
        bunch.target,
        test_size=DIGITS_TEST_FRACTION,
        stratify=bunch.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    return _Raw(
        torch.from_numpy(x_tr).unsqueeze(1),
        torch.as_tensor(y_tr, dtype=torch.int64),
        torch.from_numpy(x_te).unsqueeze(1),
        torch.as_tensor(y_te, dtype=torch.int64),
    )


def _images_to_float(data: Any) -> Tensor:
    """torchvision's ``.data`` (uint8 [N,H,W] tensor or [N,H,W,C] array) -> [N,C,H,W] in [0,1]."""
    images = torch.as_tensor(np.asarray(data))
    if images.ndim == 3:
        images = images.unsqueeze(1)
    else:
        images = images.permute(0, 3, 1, 2)
    return images.contiguous().float().div_(PIXEL_MAX)


def _torchvision_reader(class_name: str, **kwargs: Any) -> Reader:
    """Reader for the ``torchvision.datasets`` class ``class_name`` taking ``(root, train=,
    download=)``; torchvision is imported on first read, so a digits client never pays
    for it (about 1.8 s of a ClientApp's start)."""

    def read(root: Path, download: bool) -> _Raw:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, class_name)
        train = cls(str(root), train=True, download=download, **kwargs)
        test = cls(str(root), train=False, download=download, **kwargs)
        return _Raw(
            _images_to_float(train.data),
            torch.as_tensor(np.asarray(train.targets), dtype=torch.int64),
            _images_to_float(test.data),
            torch.as_tensor(np.asarray(test.targets), dtype=torch.int64),
        )

    return read


DATASETS: dict[str, DatasetSource] = {
    "digits": DatasetSource(DatasetSpec("digits", (1, 8, 8), 10), _read_digits, "(bundled)"),
    "mnist": DatasetSource(
        DatasetSpec("mnist", (1, 28, 28), 10),
        _torchvision_reader("MNIST"),
        "MNIST/raw",
    ),
    "fmnist": DatasetSource(
        DatasetSpec("fmnist", (1, 28, 28), 10),
        _torchvision_reader("FashionMNIST"),
        "FashionMNIST/raw",
    ),
    "emnist": DatasetSource(
        DatasetSpec("emnist", (1, 28, 28), 47),
        _torchvision_reader("EMNIST", split="balanced"),
        "EMNIST/raw",
    ),
    "cifar10": DatasetSource(
        DatasetSpec("cifar10", (3, 32, 32), 10),
        _torchvision_reader("CIFAR10"),
        "cifar-10-batches-py",
    ),
    "cifar100": DatasetSource(
        DatasetSpec("cifar100", (3, 32, 32), 100),
        _torchvision_reader("CIFAR100"),
        "cifar-100-python",
    ),
}


def _source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}") from None


def get_spec(name: str) -> DatasetSpec:
    """The dataset's shape and class count, without reading any data."""
    return _source(name).spec


def _normalise(raw: _Raw) -> tuple[Tensor, Tensor]:
    """Per-channel (x - mean) / std with statistics of the training images only."""
    mean = raw.x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = raw.x_train.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(STD_FLOOR)
    return (raw.x_train - mean) / std, (raw.x_test - mean) / std


def _validate(raw: _Raw, spec: DatasetSpec, where: Path) -> None:
    """Refuse data whose shape or labels contradict the spec (models are sized from it)."""
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if tuple(x.shape[1:]) != spec.input_shape or len(x) == 0:
            raise DatasetError(
                f"{spec.name} {split} images under {where} have shape {tuple(x.shape)}, "
                f"expected [N>0, {', '.join(map(str, spec.input_shape))}]"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.n_classes):
            raise DatasetError(
                f"{spec.name} {split} labels under {where} fall outside 0..{spec.n_classes - 1}"
            )


@functools.cache
def _load_cached(name: str, root: str, download: bool) -> tuple[TensorData, TensorData]:
    source = _source(name)
    where = Path(root) / source.location
    try:
        raw = source.read(Path(root), download)
    except Exception as exc:
        # Readers fail in many ways (torchvision: RuntimeError "not found", assertion or
        # unpickling errors on corrupt files, network errors on download); to the caller
        # all of them mean "this dataset cannot be loaded from there". The cause is chained.
        raise DatasetError(
            f"dataset {name!r} could not be loaded from {where} (data-root={root}). Put the "
            "files there, point the `data-root` setting at the folder that holds them, or "
            f"set `download` to true (needs internet access). Reader said: {exc}"
        ) from exc
    _validate(raw, source.spec, where)
    x_train, x_test = _normalise(raw)
    logger.info("loaded %s: %d train / %d test from %s", name, len(raw.y_train), len(raw.y_test), where)
    return TensorData(x_train, raw.y_train), TensorData(x_test, raw.y_test)


def load_dataset(
    name: str, data_root: str | Path, download: bool = False
) -> tuple[TensorData, TensorData, DatasetSpec]:
    """``(train, test, spec)`` for ``name``, read once per process and then cached.

    ``download=True`` lets torchvision fetch missing files (needs internet); with
    ``download=False`` missing files raise :class:`DatasetError` saying where we looked.
    """
    spec = _source(name).spec
    root = str(Path(data_root).expanduser().resolve())
    train, test = _load_cached(name, root, bool(download))
    return train, test, spec


def clear_cache() -> None:
    """Forget loaded datasets and partitions (tests, or to free memory)."""
    _load_cached.cache_clear()
    _partition_cached.cache_clear()


def _check_num_partitions(n: int, num_partitions: int, min_size: int = 1) -> None:
    if num_partitions < 1:
        raise ConfigError(f"num_partitions must be >= 1, got {num_partitions}")
    if min_size < 0:
        raise ConfigError(f"min_size must be >= 0, got {min_size}")
    if n < num_partitions * min_size:
        raise ConfigError(f"{n} samples cannot give {num_partitions} partitions of at least {min_size}")


def iid_partition(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into near-equal sorted parts."""
    _check_num_partitions(n, num_partitions)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_partitions)]


def _dirichlet_draw(
    labels: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """One draw: each class's shuffled indices cut by Dirichlet(alpha) proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.append(chunk)
    return parts


def _repair(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move samples from the largest partitions to those below ``min_size`` (deterministic)."""
    parts = [p.copy() for p in parts]
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = max(range(len(parts)), key=lambda j: (len(parts[j]), -j))
            parts[i] = np.append(parts[i], parts[donor][-1])
            parts[donor] = parts[donor][:-1]
    return parts


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed split: per class, partition shares drawn from Dirichlet(alpha).

    Small ``alpha`` gives each partition few classes; large ``alpha`` approaches IID.
    Draws are repeated up to ``DIRICHLET_RESAMPLES`` times until every partition holds
    ``min_size`` samples; if that never happens, the last draw is repaired by moving
    samples from the largest partitions. The result is a disjoint cover of all indices,
    each part sorted, and depends only on the arguments.
    """
    labels = np.asarray(labels)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"Dirichlet alpha must be finite and > 0, got {alpha}")
    _check_num_partitions(len(labels), num_partitions, min_size)
    rng = np.random.default_rng(seed)
    merged: list[np.ndarray] = []
    for _ in range(DIRICHLET_RESAMPLES):
        draw = _dirichlet_draw(labels, num_partitions, alpha, rng)
        merged = [np.concatenate(chunks).astype(np.int64) for chunks in draw]
        if min(len(p) for p in merged) >= min_size:
            break
    else:
        logger.debug("dirichlet(alpha=%s): repairing partitions below %d", alpha, min_size)
        merged = _repair(merged, min_size)
    return [np.sort(p) for p in merged]


def partition_indices(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> list[np.ndarray]:
    """IID when ``alpha == inf``, else Dirichlet(alpha) label skew; ``alpha <= 0`` is refused."""
    if math.isnan(alpha) or alpha <= 0:
        raise ConfigError(f"alpha must be > 0 (inf for IID), got {alpha}")
    if math.isinf(alpha):
        return iid_partition(len(labels), num_partitions, seed)
    return dirichlet_partition(labels, num_partitions, alpha, seed)


@functools.lru_cache(maxsize=32)
def _partition_cached(
    name: str, root: str, download: bool, num_partitions: int, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    train, _ = _load_cached(name, root, download)
    return tuple(partition_indices(train.y.numpy(), num_partitions, alpha, seed))


def load_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    data_root: str | Path,
    download: bool = False,
) -> TensorData:
    """Training data of client ``partition_id`` out of ``num_partitions`` (see module doc)."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition_id {partition_id} not in [0, {num_partitions})")
    _source(name)
    root = str(Path(data_root).expanduser().resolve())
    parts = _partition_cached(name, root, bool(download), num_partitions, float(alpha), seed)
    train, _ = _load_cached(name, root, bool(download))
    return train.subset(parts[partition_id])


def load_test(name: str, data_root: str | Path, download: bool = False) -> TensorData:
    """The held-out test split of ``name`` (normalised with the training statistics)."""
    _, test, _ = load_dataset(name, data_root, download)
    return test
