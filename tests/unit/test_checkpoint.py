"""Crash-safe checkpoints (e3sfc_core.checkpoint) and the client state that uses them."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from e3sfc_core.checkpoint import load_checkpoint, save_checkpoint
from e3sfc_core.client import ClientState, load_client_state, save_client_state
from e3sfc_core.errors import E3SFCError


def sample() -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "weights": torch.randn(100, generator=g),
        "residual": torch.randn(100, generator=g).double(),
        "history.3": torch.tensor(list(b"E3SF\x01\x00"), dtype=torch.uint8),
        "count": torch.tensor([7], dtype=torch.int64),
        "empty": torch.zeros(0),
    }
    meta: dict[str, object] = {
        "version": 3,
        "records": [{"round": 1, "accuracy": 0.5, "loss": float("nan"), "skipped": False}],
        "name": "r\u00e9sum\u00e9",
        "synced": [[0, None], [1, 2]],
    }
    return tensors, meta


def assert_same(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(tensors) == set(expected)
    for k, v in expected.items():
        assert tensors[k].dtype == v.dtype, k
        torch.testing.assert_close(tensors[k], v, rtol=0, atol=0)


def test_round_trip(tmp_path: Path) -> None:
    # Prepare
    tensors, meta = sample()
    path = tmp_path / "sub" / "checkpoint.npz"

    # Execute
    save_checkpoint(path, tensors, meta)
    got_tensors, got_meta = load_checkpoint(path)

    # Assert
    assert_same(got_tensors, tensors)
    assert math.isnan(got_meta["records"][0].pop("loss"))
    meta["records"][0].pop("loss")  # type: ignore[index]
    assert got_meta == meta
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["checkpoint.npz"]


def test_loaded_tensors_are_writable_copies(tmp_path: Path) -> None:
    # Prepare
    tensors, meta = sample()
    save_checkpoint(tmp_path / "c.npz", tensors, meta)

    # Execute
    got, _ = load_checkpoint(tmp_path / "c.npz")
    got["weights"].add_(1.0)

    # Assert: no warning-prone read-only buffers, and the file is unchanged
    again, _ = load_checkpoint(tmp_path / "c.npz")
    torch.testing.assert_close(again["weights"], tensors["weights"], rtol=0, atol=0)


def test_overwrite_replaces_the_old_checkpoint(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"version": 1})

    # Execute
    save_checkpoint(path, {"w": torch.ones(3)}, {"version": 2})

    # Assert
    tensors, meta = load_checkpoint(path)
    assert meta == {"version": 2}
    torch.testing.assert_close(tensors["w"], torch.ones(3))


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_the_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    # Prepare
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": torch.arange(5.0)}, {"version": 1})
    before = path.read_bytes()
    real_savez = np.savez

    def half_then_fail(fh: io.BufferedWriter, **arrays: np.ndarray) -> None:
        buf = io.BytesIO()
        real_savez(buf, **arrays)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise error

    monkeypatch.setattr(np, "savez", half_then_fail)

    # Execute
    with pytest.raises(type(error)):
        save_checkpoint(path, {"w": torch.full((5,), 9.0)}, {"version": 2})

    # Assert
    monkeypatch.undo()
    assert path.read_bytes() == before
    tensors, meta = load_checkpoint(path)
    assert meta == {"version": 1}
    torch.testing.assert_close(tensors["w"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # no temp file left behind


def test_failure_on_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("no space")

    monkeypatch.setattr(np, "savez", fail)

    # Execute
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c.npz", {"w": torch.zeros(1)}, {})

    # Assert
    assert list(tmp_path.iterdir()) == []


def test_npz_without_metadata_is_rejected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.zeros(3))

    # Execute / Assert
    with pytest.raises(E3SFCError, match="metadata"):
        load_checkpoint(path)


def test_pickled_content_is_refused(tmp_path: Path) -> None:
    # Prepare: an object array can only be stored by pickling it
    path = tmp_path / "evil.npz"
    meta = np.frombuffer(json.dumps({}).encode(), dtype=np.uint8)
    np.savez(path, __meta_json__=meta, w=np.array([{"a": 1}], dtype=object))

    # Execute / Assert
    with pytest.raises(E3SFCError):
        load_checkpoint(path)


def test_missing_file_and_garbage_raise_e3sfc_error(tmp_path: Path) -> None:
    # Prepare
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"hello, world" * 10)

    # Execute / Assert
    with pytest.raises(E3SFCError):
        load_checkpoint(tmp_path / "missing.npz")
    with pytest.raises(E3SFCError):
        load_checkpoint(garbage)


@pytest.mark.parametrize("case", ["truncated", "empty", "bad-meta-json"])
def test_corrupt_checkpoint_raises_e3sfc_error(tmp_path: Path, case: str) -> None:
    # Prepare
    path = tmp_path / "c.npz"
    tensors, meta = sample()
    save_checkpoint(path, tensors, meta)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    elif case == "empty":
        path.write_bytes(b"")
    else:
        np.savez(path, __meta_json__=np.frombuffer(b"{not json", dtype=np.uint8))

    # Execute / Assert
    with pytest.raises(E3SFCError):
        load_checkpoint(path)


# ------------------------------------------------------------------- client state


def test_client_state_round_trip(tmp_path: Path) -> None:
    # Prepare
    g = torch.Generator().manual_seed(1)
    state = ClientState(torch.randn(10, generator=g), torch.randn(10, generator=g), None, pending_round=4)
    path = tmp_path / "client-0.npz"

    # Execute
    save_client_state(path, state)
    back = load_client_state(path)

    # Assert
    assert back.pending is None and back.pending_round == 4
    torch.testing.assert_close(back.weights, state.weights, rtol=0, atol=0)
    torch.testing.assert_close(back.residual, state.residual, rtol=0, atol=0)


def test_missing_client_state_is_empty(tmp_path: Path) -> None:
    # Execute
    state = load_client_state(tmp_path / "nobody.npz")

    # Assert
    assert state == ClientState()


def test_client_state_tensors_round_trip_and_fitted() -> None:
    # Prepare
    state = ClientState(torch.zeros(4), torch.ones(4), torch.full((3,), 2.0), pending_round=2)

    # Execute
    back = ClientState.from_tensors({k: v.numpy() for k, v in state.to_tensors().items()})
    fitted = back.fitted(4)

    # Assert
    assert back.pending_round == 2
    torch.testing.assert_close(back.pending, torch.full((3,), 2.0))
    assert fitted.pending is None  # wrong size for a 4-weight model: dropped
    torch.testing.assert_close(fitted.residual, torch.ones(4))
    assert ClientState.from_tensors({}).pending_round == -1


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_interrupted_after_writing_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    # Prepare: the new bytes are in the temp file when the process "dies" (before rename)
    from e3sfc_core.checkpoint import atomic_write_bytes

    path = tmp_path / "metrics.csv"
    atomic_write_bytes(path, b"old")

    def die(fd: int) -> None:
        raise error

    monkeypatch.setattr("os.fsync", die)
    # Execute
    with pytest.raises(type(error)):
        atomic_write_bytes(path, b"new and longer")
    # Assert
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
