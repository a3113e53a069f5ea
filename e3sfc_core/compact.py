"""What the sparse and quantised baselines send, coded as a careful implementation would.

Why: 32-bit indices and one byte per QSGD level charge Top-k, STC and QSGD several
times what they need, which makes comparisons unfair to them. Two codes of wire format
v3 live here (their byte layout is part of the spec in ``payload.py``; the bit-level
codes are in ``bitcodec.py``), each with a size bound the compressors use for budgets:

* **Positions** (Top-k, STC): ``k`` strictly increasing indices below ``numel``, sent as
  Rice-coded gaps (``gap_0 = idx_0``, ``gap_i = idx_i - idx_(i-1) - 1``) or as a bitmap
  of ``numel`` bits, whichever takes fewer bytes (the bitmap on a tie: same bytes, simpler
  to decode). Rice with ``b = 0`` (unary gaps) takes ``idx_(k-1) + 1 <= numel`` bits, so
  the bitmap never saves bytes; it is chosen only for dense selections, where it ties.
* **Levels** (QSGD): ``numel`` integers in ``[-s, s]``, sent as Elias-gamma run lengths
  of zeros, Elias-gamma magnitudes and sign bits of the nonzero entries, or as plain
  ``ceil(log2(2s+1))``-bit fields, whichever takes fewer bytes (the packed fields on a
  tie).

The encoder's choices (mode, Rice parameter) are part of the format: the decoder
recomputes them and refuses a stream that differs, so every body has one encoding.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .bitcodec import BitReader, BitWriter, IntArray, best_rice_parameter, gamma_bits, rice_bits
from .errors import PayloadError

MODE_RICE, MODE_BITMAP = 0, 1
MODE_GAMMA, MODE_PACKED = 0, 1
MAX_RICE = 30  # gaps are below numel <= 2**31 - 1


def _bytes(bits: int) -> int:
    return (bits + 7) // 8


# -------------------------------------------------------------------------- positions


def gaps_of(indices: IntArray) -> IntArray:
    """Zeros skipped before each index (``idx`` strictly increasing, ``>= 0``)."""
    idx = np.asarray(indices, dtype=np.int64)
    return np.diff(idx, prepend=-1) - 1


def _choose_positions(gaps: IntArray, numel: int) -> tuple[int, int, int]:
    """(mode, Rice parameter, section bytes) that ``encode_positions`` writes."""
    b = best_rice_parameter(gaps, MAX_RICE)
    rice = _bytes(rice_bits(gaps, b))
    bitmap = _bytes(numel)
    return (MODE_RICE, b, rice) if rice < bitmap else (MODE_BITMAP, 0, bitmap)


def encode_positions(indices: IntArray, numel: int) -> tuple[int, int, bytes]:
    """``(mode, rice_parameter, section)`` of strictly increasing ``indices < numel``."""
    idx = np.asarray(indices, dtype=np.int64)
    gaps = gaps_of(idx)
    mode, b, _ = _choose_positions(gaps, numel)
    w = BitWriter()
    if mode == MODE_RICE:
        w.rice(gaps, b)
    else:
        flags = np.zeros(numel, dtype=bool)
        flags[idx] = True
        w.flags(flags)
    return mode, b, w.getvalue()


def decode_positions(section: memoryview, mode: int, b: int, k: int, numel: int) -> IntArray:
    """The ``k`` indices of a positions section that fills ``section`` exactly."""
    if mode == MODE_BITMAP:
        if b != 0:
            raise PayloadError("positions: the Rice parameter byte of a bitmap must be 0")
        if len(section) != _bytes(numel):
            raise PayloadError(
                f"positions: a bitmap of {numel} bits takes {_bytes(numel)} bytes, "
                f"the body leaves {len(section)}"
            )
        r = BitReader(section, "position bitmap")
        idx = np.flatnonzero(r.flags(numel)).astype(np.int64)
        r.finish()
        if idx.size != k:
            raise PayloadError(f"positions: the bitmap has {idx.size} set bits, k is {k}")
    elif mode == MODE_RICE:
        if not 0 <= b <= MAX_RICE:
            raise PayloadError(f"positions: Rice parameter {b} out of range 0..{MAX_RICE}")
        r = BitReader(section, "Rice-coded positions")
        gaps = r.rice(k, b, max(numel - 1, 0))
        r.finish()
        idx = np.cumsum(gaps + 1) - 1
        if k and int(idx[-1]) >= numel:
            raise PayloadError(f"positions: indices must be strictly increasing and below numel={numel}")
    else:
        raise PayloadError(f"positions: unknown mode {mode} (0 Rice gaps, 1 bitmap)")
    if _choose_positions(gaps_of(idx), numel)[:2] != (mode, b):
        raise PayloadError("positions: mode or Rice parameter is not the encoder's choice (non-canonical)")
    return idx


def positions_bytes_bound(numel: int, k: int) -> int:
    """Most bytes a positions section of ``k`` of ``numel`` can take (exact when ``k`` is
    0 or ``numel``): the gaps sum to at most ``numel - k``, so for every ``b`` the Rice
    code takes at most ``k (1 + b) + floor((numel - k) / 2^b)`` bits, and the encoder's
    choice is no larger than the best of these nor than the bitmap."""
    if k <= 0:
        return 0
    rice = min(k * (1 + b) + ((numel - k) >> b) for b in range(MAX_RICE + 1))
    return min(_bytes(rice), _bytes(numel))


# ---------------------------------------------------------------------------- levels


def packed_width(levels: int) -> int:
    """``ceil(log2(2s + 1))``: bits of one level in ``[-s, s]`` stored as ``q + s``."""
    return (2 * levels).bit_length()


def _gamma_section_bits(q: IntArray) -> int:
    nz = np.flatnonzero(q)
    runs = gaps_of(nz) + 1
    return gamma_bits(runs) + gamma_bits(np.abs(q[nz])) + nz.size


def _choose_levels(q: IntArray, levels: int) -> tuple[int, int]:
    """(mode, section bytes) that ``encode_levels`` writes."""
    gamma = 4 + _bytes(_gamma_section_bits(q))
    packed = _bytes(q.size * packed_width(levels))
    return (MODE_GAMMA, gamma) if gamma < packed else (MODE_PACKED, packed)


def encode_levels(q: IntArray, levels: int) -> tuple[int, bytes]:
    """``(mode, section)`` of integers ``|q| <= levels``.

    Gamma section: ``u32 m`` (nonzero count), then the bit stream ``gamma(run_j + 1)``
    for the zeros before each nonzero, ``gamma(|q_j|)``, and one sign bit per nonzero
    (set: negative). Packed section: ``q + s`` in ``packed_width(s)``-bit fields.
    """
    qa = np.asarray(q, dtype=np.int64)
    mode, _ = _choose_levels(qa, levels)
    w = BitWriter()
    if mode == MODE_PACKED:
        w.fields(qa + levels, packed_width(levels))
        return mode, w.getvalue()
    nz = np.flatnonzero(qa)
    w.gamma(gaps_of(nz) + 1)
    w.gamma(np.abs(qa[nz]))
    w.flags(qa[nz] < 0)
    return mode, struct.pack("<I", nz.size) + w.getvalue()


def decode_levels(
    section: memoryview, mode: int, levels: int, numel: int
) -> np.ndarray[Any, np.dtype[np.int8]]:
    """The ``numel`` levels of a section that fills ``section`` exactly (int8). It
    allocates ``numel`` bytes: the caller bounds ``numel`` by the data first."""
    if mode == MODE_PACKED:
        width = packed_width(levels)
        if len(section) != _bytes(numel * width):
            raise PayloadError(
                f"QSGD levels: {numel} packed {width}-bit levels take {_bytes(numel * width)} bytes, "
                f"got {len(section)}"
            )
        r = BitReader(section, "packed QSGD levels")
        stored = r.fields(numel, width)
        r.finish()
        if stored.size and int(stored.max()) > 2 * levels:
            raise PayloadError("QSGD levels exceed the declared number of levels")
        q = (stored - levels).astype(np.int8)
    elif mode == MODE_GAMMA:
        if len(section) < 4:
            raise PayloadError("QSGD levels: gamma section too short for its nonzero count")
        (m,) = struct.unpack("<I", section[:4])
        if m > numel or 3 * m > 8 * (len(section) - 4):
            raise PayloadError(f"QSGD levels: declared {m} nonzero levels do not fit (numel {numel})")
        r = BitReader(section[4:], "gamma-coded QSGD levels")
        runs = r.gamma(m, max(numel, 1))
        mags = r.gamma(m, levels)
        negative = r.flags(m)
        r.finish()
        pos = np.cumsum(runs) - 1
        if m and int(pos[-1]) >= numel:
            raise PayloadError(f"QSGD levels: run lengths reach past numel={numel}")
        q = np.zeros(numel, dtype=np.int8)
        q[pos] = np.where(negative, -mags, mags).astype(np.int8)
    else:
        raise PayloadError(f"QSGD levels: unknown mode {mode} (0 gamma, 1 packed)")
    if _choose_levels(q.astype(np.int64), levels)[0] != mode:
        raise PayloadError("QSGD levels: mode is not the encoder's choice (non-canonical)")
    return q


def levels_bytes_bound(numel: int, levels: int) -> int:
    """Most bytes a levels section can take (the packed size, reached when most entries
    are nonzero): the encoder never picks a longer gamma section."""
    return _bytes(numel * packed_width(levels))
