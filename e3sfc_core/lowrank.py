"""Body of the ``LOWRANK`` codec (PowerSGD): one record per parameter tensor.

Kept apart from :mod:`e3sfc_core.payload` (which imports it) so that the codec is one
small, self-contained unit; the layout is specified in ``payload``'s docstring:
``u32 count``, ``count x (u32 rows, u32 cols, u16 rank)``, then every float of every
record in the header's float dtype. Rank 0 is a dense block of ``rows * cols`` values;
rank ``r >= 1`` is ``P`` (``rows x r``, row-major) then ``Q`` (``cols x r``), the block
being ``P @ Q.T``, allowed only where it is smaller than dense
(``r * (rows + cols) < rows * cols``), so a sender cannot inflate a tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import PayloadError

RECORD = struct.Struct("<IIH")  # rows, cols, rank
MAX_RANK = 1024


@dataclass(frozen=True)
class LowRankBody:
    """Per tensor ``(rows, cols, rank)`` and all the floats, in wire order."""

    layout: tuple[tuple[int, int, int], ...]
    values: torch.Tensor  # float32 [sum of record_floats(layout)]


def record_floats(rows: int, cols: int, rank: int) -> int:
    """Floats one record carries: the dense block, or ``P`` and ``Q``."""
    return rows * cols if rank == 0 else rank * (rows + cols)


def _check_record(rows: int, cols: int, rank: int) -> None:
    if rows < 1 or cols < 1:
        raise PayloadError(f"low-rank record has an empty shape {rows}x{cols}")
    if rank > MAX_RANK:
        raise PayloadError(f"low-rank record rank {rank} exceeds {MAX_RANK}")
    if rank and rank * (rows + cols) >= rows * cols:
        raise PayloadError(f"rank {rank} of a {rows}x{cols} block is not smaller than dense")


def encode_lowrank(body: LowRankBody, dtype: np.dtype[Any], numel: int) -> bytes:
    """Serialise ``body``; its records must cover exactly ``numel`` weights."""
    if len(body.layout) >= 2**32:
        raise PayloadError("too many low-rank records")
    for rows, cols, rank in body.layout:
        if not (0 <= rows < 2**32 and 0 <= cols < 2**32 and 0 <= rank < 2**16):
            raise PayloadError(f"low-rank record {(rows, cols, rank)} not encodable")
        _check_record(rows, cols, rank)
    if sum(r * c for r, c, _ in body.layout) != numel:
        raise PayloadError(f"low-rank records do not cover numel={numel}")
    floats = sum(record_floats(*rec) for rec in body.layout)
    if body.values.numel() != floats:
        raise PayloadError(f"low-rank body has {body.values.numel()} values, its records need {floats}")
    arr = body.values.detach().to("cpu", torch.float32).contiguous().numpy().astype(dtype)
    if not np.all(np.isfinite(arr)):
        raise PayloadError("low-rank values are not finite in the wire dtype")
    head = struct.pack("<I", len(body.layout)) + b"".join(RECORD.pack(*rec) for rec in body.layout)
    return head + arr.tobytes()


def decode_lowrank(data: memoryview, dtype: np.dtype[Any], numel: int) -> LowRankBody:
    """Parse a whole ``LOWRANK`` body; every size is checked before anything is allocated."""
    if len(data) < 4:
        raise PayloadError("LOWRANK body too short for the record count")
    (count,) = struct.unpack_from("<I", data, 0)
    if count * RECORD.size > len(data) - 4:
        raise PayloadError(f"declared {count} low-rank records need more bytes than the body holds")
    layout, covered, floats = [], 0, 0
    for i in range(count):
        rows, cols, rank = RECORD.unpack_from(data, 4 + i * RECORD.size)
        _check_record(rows, cols, rank)
        covered += rows * cols
        if covered > numel:
            raise PayloadError(f"low-rank records cover more than numel={numel}")
        floats += record_floats(rows, cols, rank)
        layout.append((int(rows), int(cols), int(rank)))
    if covered != numel:
        raise PayloadError(f"low-rank records cover {covered} weights, numel is {numel}")
    start = 4 + count * RECORD.size
    if floats * dtype.itemsize != len(data) - start:
        raise PayloadError(
            f"low-rank records need {floats * dtype.itemsize} bytes of values, "
            f"the body has {len(data) - start}"
        )
    arr = np.frombuffer(data[start:], dtype=dtype)
    if not np.all(np.isfinite(arr)):
        raise PayloadError("low-rank values contain NaN or Inf")
    return LowRankBody(layout=tuple(layout), values=torch.from_numpy(arr.astype(np.float32)))
