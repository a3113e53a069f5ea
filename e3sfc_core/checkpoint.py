"""Crash-safe server checkpoints without pickle.

A checkpoint is one ``.npz`` file (``np.savez``: plain arrays, loaded back with
``allow_pickle=False``) holding the server tensors and a UTF-8 JSON blob with the rest.
It is written to a temporary file in the same directory and renamed over the old one, so a
crash leaves either the previous checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import E3SFCError

_META_KEY = "__meta_json__"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, and rename it over
    ``path``: readers (and a process killed mid-write) see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write ``tensors`` and JSON-able ``meta`` to ``path``."""
    arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if _META_KEY not in arrays:
            raise E3SFCError(f"{path} is not an E-3SFC checkpoint (no metadata)")
        meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
    except E3SFCError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        # a truncated or foreign file: say which one, whatever layer noticed
        raise E3SFCError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, meta
