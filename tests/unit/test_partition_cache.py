"""The on-disk partition cache: it returns what load_partition returns, never trusts a
file it did not verify, and survives a disk it cannot write."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from e3sfc_core.datasets import TensorData, clear_cache, load_partition
from e3sfc_core.partition_cache import cache_file, cache_key, cached_partition, default_cache_dir

ARGS = {"alpha": 0.5, "seed": 3, "data_root": "unused", "download": False}


def _cached(cache: Path, partition_id: int = 2, **kw: object) -> TensorData:
    data = cached_partition("digits", partition_id, 5, cache_dir=cache, **{**ARGS, **kw})  # type: ignore[arg-type]
    return data


def _file(cache: Path, partition_id: int = 2) -> Path:
    key = cache_key("digits", partition_id, 5, ARGS["alpha"], ARGS["seed"], "unused")  # type: ignore[arg-type]
    return cache_file(cache, key)


def _same(a: TensorData, b: TensorData) -> bool:
    return torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_a_cached_partition_equals_the_computed_one_and_is_read_back(tmp_path: Path) -> None:
    # Prepare
    expected = load_partition("digits", 2, 5, alpha=0.5, seed=3, data_root="unused")

    # Execute
    first = _cached(tmp_path)
    second = _cached(tmp_path)

    # Assert: one file per key; what it holds is exactly the partition
    assert _file(tmp_path).is_file() and len(list(tmp_path.iterdir())) == 1
    assert _same(first, expected) and _same(second, expected)


def test_every_key_field_selects_its_own_file(tmp_path: Path) -> None:
    # Execute
    _cached(tmp_path)
    _cached(tmp_path, partition_id=3)
    _cached(tmp_path, seed=4)
    _cached(tmp_path, alpha=float("inf"))

    # Assert
    assert len(list(tmp_path.glob("*.npz"))) == 4
    assert _same(_cached(tmp_path, seed=4), load_partition("digits", 2, 5, alpha=0.5, seed=4, data_root="x"))


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip-pixel", "other-key", "garbage"],
)
def test_a_damaged_or_foreign_file_is_ignored_and_rewritten(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a good file, then damage it
    expected = _cached(tmp_path)
    path = _file(tmp_path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not an npz file at all")
    else:
        if damage == "flip-pixel":
            arrays["x"] = arrays["x"].copy()
            arrays["x"][0, 0, 0, 0] += 1.0
        else:
            key = json.loads(bytes(arrays["key"]).decode())
            key["seed"] = 99
            arrays["key"] = np.frombuffer(json.dumps(key, sort_keys=True).encode(), dtype=np.uint8)
        with path.open("wb") as f:
            np.savez(f, **arrays)

    # Execute
    with caplog.at_level(logging.WARNING, logger="e3sfc_core.partition_cache"):
        data = _cached(tmp_path)

    # Assert: the right data, a warning naming the file, and a good file again
    assert _same(data, expected)
    assert str(path) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="e3sfc_core.partition_cache"):
        _cached(tmp_path)
    assert caplog.text == ""


def test_a_cache_that_cannot_be_written_only_costs_the_speed_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the cache folder's place is taken by a file
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")

    # Execute
    with caplog.at_level(logging.WARNING, logger="e3sfc_core.partition_cache"):
        data = _cached(blocked)

    # Assert
    assert _same(data, load_partition("digits", 2, 5, alpha=0.5, seed=3, data_root="unused"))
    assert "could not write" in caplog.text


def test_the_default_folder_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "e3sfc" / "partitions"


def test_a_cache_hit_loads_neither_scikit_learn_nor_the_dataset(tmp_path: Path) -> None:
    # Prepare
    _cached(tmp_path)
    probe = (
        "import sys\n"
        "from e3sfc_core.partition_cache import cached_partition\n"
        f"d = cached_partition('digits', 2, 5, alpha=0.5, seed=3, data_root='unused', download=False,"
        f" cache_dir={str(tmp_path)!r})\n"
        "print(len(d), 'sklearn' in sys.modules)"
    )

    # Execute
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )

    # Assert
    n, sklearn = out.stdout.split()
    assert int(n) == len(_cached(tmp_path)) and sklearn == "False"


def test_replacing_a_source_file_changes_the_key(tmp_path: Path) -> None:
    # Prepare: MNIST files in the real on-disk format
    from tests.unit.test_datasets import _write_mnist_like

    root, cache = tmp_path / "data", tmp_path / "cache"
    _write_mnist_like(root, "MNIST", ("train", "t10k"), 10)
    args = {"alpha": 1.0, "seed": 0, "data_root": root, "download": False, "cache_dir": cache}
    before = cached_partition("mnist", 0, 2, **args)  # type: ignore[arg-type]

    # Execute: the training images are replaced (new contents, new time)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF
    images.write_bytes(bytes(data))
    clear_cache()  # a new process: nothing read before is in memory
    after = cached_partition("mnist", 0, 2, **args)  # type: ignore[arg-type]

    # Assert: a second file, and the partition read from the new files
    assert len(list(cache.glob("mnist-*.npz"))) == 2
    # (one pixel moves the normalisation, so every image differs a little)
    assert not torch.equal(before.x, after.x)
    assert _same(after, load_partition("mnist", 0, 2, alpha=1.0, seed=0, data_root=root))
