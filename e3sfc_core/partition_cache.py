"""An on-disk cache of one client's training partition, for processes that start cold.

A deployed SuperNode starts a fresh ClientApp process for every message, so without a
cache each round re-reads the whole dataset (importing scikit-learn or torchvision to do
it) and re-partitions it, about 1.2-1.5 s per message for digits or MNIST. The cache holds
exactly what :func:`~e3sfc_core.datasets.load_partition` returns for one key (dataset,
partitioning, seed, partition id, and the size and time of every source file) as a plain
``.npz`` file read without pickle. Everything read is checked: the key, the shapes and
dtypes against the dataset's spec, the labels' range and a SHA-256 of the arrays; a file
that fails any check is ignored, with a warning, and rewritten. A cache that cannot be
written (a read-only disk) only costs the speed-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import DATASETS, TensorData, get_spec, load_partition
from .errors import DatasetError

logger = logging.getLogger(__name__)

FORMAT = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/e3sfc/partitions`` (``~/.cache`` when unset): per user, outside
    the data folder, which may be read-only or shared."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "e3sfc" / "partitions"


def source_fingerprint(name: str, data_root: str | Path) -> list[list[Any]]:
    """Relative path, size and modification time of every file the dataset is read from
    (empty for the bundled digits): a replaced file changes the key."""
    location = DATASETS[name].location
    if location.startswith("("):
        return []
    folder = Path(data_root).expanduser().resolve() / location
    if not folder.is_dir():
        return []
    return [
        [str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def cache_key(
    name: str, partition_id: int, num_partitions: int, alpha: float, seed: int, data_root: str | Path
) -> dict[str, Any]:
    """Everything the partition's contents depend on."""
    return {
        "format": FORMAT,
        "dataset": name,
        "partition-id": partition_id,
        "num-partitions": num_partitions,
        "alpha": "iid" if math.isinf(alpha) else float(alpha),
        "seed": seed,
        "source": source_fingerprint(name, data_root),
    }


def cache_file(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """One file per key; the name carries a digest of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['dataset']}-p{key['partition-id']}-{digest}.npz"


def _digest(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


def _read(path: Path, key: dict[str, Any]) -> TensorData:
    """The cached partition, or :class:`DatasetError` saying why the file is not usable."""
    spec = get_spec(key["dataset"])
    try:
        with np.load(path, allow_pickle=False) as f:
            stored_key = json.loads(bytes(f["key"]).decode())
            x, y, digest = f["x"], f["y"], bytes(f["digest"]).decode()
    except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"unreadable: {exc}") from None
    if stored_key != key:
        raise DatasetError("written for another key")
    if x.dtype != np.float32 or x.ndim != 4 or tuple(x.shape[1:]) != spec.input_shape:
        raise DatasetError(f"images have dtype {x.dtype} and shape {x.shape}")
    if y.dtype != np.int64 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise DatasetError(f"labels have dtype {y.dtype} and shape {y.shape}")
    if int(y.min()) < 0 or int(y.max()) >= spec.n_classes:
        raise DatasetError(f"labels fall outside 0..{spec.n_classes - 1}")
    if _digest(x, y) != digest:
        raise DatasetError("contents do not match their checksum")
    return TensorData(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()))


def _write(path: Path, key: dict[str, Any], data: TensorData) -> None:
    """Write atomically (a temporary file renamed into place), so readers never see half."""
    x, y = data.x.numpy(), data.y.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                key=np.frombuffer(json.dumps(key, sort_keys=True).encode(), dtype=np.uint8),
                x=x,
                y=y,
                digest=np.frombuffer(_digest(x, y).encode(), dtype=np.uint8),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    data_root: str | Path,
    download: bool,
    cache_dir: str | Path,
) -> TensorData:
    """:func:`~e3sfc_core.datasets.load_partition` through the cache in ``cache_dir``."""
    key = cache_key(name, partition_id, num_partitions, alpha, seed, data_root)
    path = cache_file(cache_dir, key)
    if path.exists():
        try:
            return _read(path, key)
        except DatasetError as exc:
            logger.warning("ignoring partition cache %s (%s); rebuilding it", path, exc)
    data = load_partition(
        name, partition_id, num_partitions, alpha=alpha, seed=seed, data_root=data_root, download=download
    )
    try:
        _write(path, key, data)
    except OSError as exc:
        logger.warning("could not write partition cache %s: %s", path, exc)
    return data
