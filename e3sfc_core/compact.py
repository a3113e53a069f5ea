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
  of zeros, Elias-gamma magnitudes and sign bits of the nonzero entries; as Rice-coded
  zero runs and magnitudes (format v5: near-geometric runs, magnitudes mostly 1, which a
  gamma code prices at 1.3x their entropy when ``s`` is small); or as plain
  ``ceil(log2(2s+1))``-bit fields, whichever takes fewest bytes (ties: packed, then Rice).

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
MODE_GAMMA, MODE_PACKED, MODE_RICE_LEVELS = 0, 1, 2
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


def _gamma_section_bits(q: IntArray, nz: IntArray) -> int:
    runs = gaps_of(nz) + 1
    return gamma_bits(runs) + gamma_bits(np.abs(q[nz])) + nz.size


RICE_LEVELS_HEAD = struct.Struct("<IIBBB")  # m, m2, b_run, b_gap, b_big


# the Rice-coded sequences of a Rice levels section and their parameters
_RiceParts = tuple[list[IntArray], tuple[int, int, int]]


def _rice_levels_parts(q: IntArray, nz: IntArray) -> _RiceParts:
    """The three Rice-coded sequences of a Rice levels section and their parameters:
    the zeros before each nonzero, then (magnitudes are mostly 1, which a per-magnitude
    code would spend a bit on) the nonzeros skipped before each magnitude of 2 or more,
    and those magnitudes minus 2 (``nz``: the nonzero positions of ``q``)."""
    mags = np.abs(q[nz])
    big = np.flatnonzero(mags > 1)
    parts = [gaps_of(nz), gaps_of(big), mags[big] - 2]
    b_run, b_gap, b_big = (best_rice_parameter(v, MAX_RICE) for v in parts)
    return parts, (b_run, b_gap, b_big)


def _rice_section_bits(rice: _RiceParts) -> int:
    parts, params = rice
    return sum(rice_bits(v, b) for v, b in zip(parts, params, strict=True)) + parts[0].size


def _choose_levels(q: IntArray, levels: int, version: int, nz: IntArray) -> tuple[int, _RiceParts | None]:
    """The mode ``encode_levels`` writes (``nz``: the nonzero positions of ``q``), and
    the Rice parts it weighed (None before v5: the Rice mode exists from format v5 on,
    earlier versions chose between gamma and packed only), for the caller to reuse."""
    packed = _bytes(q.size * packed_width(levels))
    choices = [(packed, MODE_PACKED)]
    rice = _rice_levels_parts(q, nz) if version >= 5 else None
    if rice is not None:
        choices.append((RICE_LEVELS_HEAD.size + _bytes(_rice_section_bits(rice)), MODE_RICE_LEVELS))
    choices.append((4 + _bytes(_gamma_section_bits(q, nz)), MODE_GAMMA))
    _, mode = min(choices, key=lambda c: c[0])  # first of equals: packed, Rice, gamma
    return mode, rice


def encode_levels(q: IntArray, levels: int) -> tuple[int, bytes]:
    """``(mode, section)`` of integers ``|q| <= levels``, as format v5 writes them.

    Gamma section: ``u32 m`` (nonzero count), then the bit stream ``gamma(run_j + 1)``
    for the zeros before each nonzero, ``gamma(|q_j|)``, and one sign bit per nonzero
    (set: negative). Rice section: ``u32 m, u32 m2, u8 b_run, u8 b_gap, u8 b_big``, then
    the stream ``rice_b_run(run_j)`` (``m`` of them), ``rice_b_gap`` of the nonzeros
    skipped before each of the ``m2`` magnitudes above 1, ``rice_b_big(|q| - 2)`` of those,
    and the ``m`` sign bits. Packed section: ``q + s`` in ``packed_width(s)``-bit fields.
    """
    qa = np.asarray(q, dtype=np.int64)
    nz = np.flatnonzero(qa)
    mode, rice = _choose_levels(qa, levels, 5, nz)
    w = BitWriter()
    if mode == MODE_PACKED:
        w.fields(qa + levels, packed_width(levels))
        return mode, w.getvalue()
    if mode == MODE_RICE_LEVELS and rice is not None:  # chosen only where it was weighed
        parts, params = rice
        for values, b in zip(parts, params, strict=True):
            w.rice(values, b)
        head = RICE_LEVELS_HEAD.pack(nz.size, parts[1].size, *params)
    else:
        w.gamma(gaps_of(nz) + 1)
        w.gamma(np.abs(qa[nz]))
        head = struct.pack("<I", nz.size)
    w.flags(qa[nz] < 0)
    return mode, head + w.getvalue()


# positions, magnitudes and sign flags of the nonzero levels, as a levels section states them
_NonzeroLevels = tuple[IntArray, IntArray, np.ndarray[Any, np.dtype[np.bool_]]]


def _nonzero_count(section: memoryview, head: int, numel: int, min_bits: int) -> int:
    """The section's ``u32 m``, refused unless ``m`` nonzeros of at least ``min_bits``
    bits each fit in what follows the ``head`` bytes."""
    if len(section) < head:
        raise PayloadError("QSGD levels: section too short for its nonzero count")
    (m,) = struct.unpack("<I", section[:4])
    if m > numel or min_bits * m > 8 * (len(section) - head):
        raise PayloadError(f"QSGD levels: declared {m} nonzero levels do not fit (numel {numel})")
    return int(m)


def _decode_rice_levels(section: memoryview, levels: int, numel: int) -> _NonzeroLevels:
    m = _nonzero_count(section, RICE_LEVELS_HEAD.size, numel, 2)  # a run bit and a sign bit at least
    _, m2, *params = RICE_LEVELS_HEAD.unpack(section[: RICE_LEVELS_HEAD.size])
    if max(params) > MAX_RICE:
        raise PayloadError(f"QSGD levels: Rice parameters {params} out of range 0..{MAX_RICE}")
    if m2 > m or (levels == 1 and m2):
        raise PayloadError(f"QSGD levels: {m2} magnitudes above 1 among {m} nonzeros with s = {levels}")
    b_run, b_gap, b_big = params
    r = BitReader(section[RICE_LEVELS_HEAD.size :], "Rice-coded QSGD levels")
    runs = r.rice(m, b_run, max(numel - 1, 0))
    big = np.cumsum(r.rice(m2, b_gap, max(m - 1, 0)) + 1) - 1
    if m2 and int(big[-1]) >= m:
        raise PayloadError(f"QSGD levels: magnitudes above 1 reach past the {m} nonzeros")
    mags = np.ones(m, dtype=np.int64)
    mags[big] = r.rice(m2, b_big, max(levels - 2, 0)) + 2
    negative = r.flags(m)
    r.finish()
    return np.cumsum(runs + 1) - 1, mags, negative


def _decode_gamma_levels(section: memoryview, levels: int, numel: int) -> _NonzeroLevels:
    m = _nonzero_count(section, 4, numel, 3)  # a run, a magnitude and a sign bit at least
    r = BitReader(section[4:], "gamma-coded QSGD levels")
    runs = r.gamma(m, max(numel, 1))
    mags = r.gamma(m, levels)
    negative = r.flags(m)
    r.finish()
    return np.cumsum(runs) - 1, mags, negative


def decode_levels(
    section: memoryview, mode: int, levels: int, numel: int, version: int = 5
) -> np.ndarray[Any, np.dtype[np.int8]]:
    """The ``numel`` levels of a section that fills ``section`` exactly (int8), as format
    ``version`` (3 and later) writes them. It allocates ``numel`` bytes: the caller bounds
    ``numel`` by the data first."""
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
    elif mode == MODE_GAMMA or (mode == MODE_RICE_LEVELS and version >= 5):
        decoder = _decode_gamma_levels if mode == MODE_GAMMA else _decode_rice_levels
        pos, mags, negative = decoder(section, levels, numel)
        if pos.size and int(pos[-1]) >= numel:
            raise PayloadError(f"QSGD levels: run lengths reach past numel={numel}")
        q = np.zeros(numel, dtype=np.int8)
        q[pos] = np.where(negative, -mags, mags).astype(np.int8)
    else:
        known = "0 gamma, 1 packed" + (
            ", 2 Rice" if version >= 5 else f"; 2 Rice is v5 and later, this is v{version}"
        )
        raise PayloadError(f"QSGD levels: unknown mode {mode} ({known})")
    q64 = q.astype(np.int64)
    nz = np.flatnonzero(q64)
    chosen, rice = _choose_levels(q64, levels, version, nz)
    if chosen != mode:
        raise PayloadError("QSGD levels: mode is not the encoder's choice (non-canonical)")
    if (
        rice is not None
        and mode == MODE_RICE_LEVELS
        and RICE_LEVELS_HEAD.unpack(section[: RICE_LEVELS_HEAD.size])[2:] != rice[1]
    ):
        raise PayloadError("QSGD levels: Rice parameters are not the encoder's choice (non-canonical)")
    return q


def levels_bytes_bound(numel: int, levels: int) -> int:
    """Most bytes a levels section can take (the packed size, reached when most entries
    are nonzero): the encoder never picks a longer gamma section."""
    return _bytes(numel * packed_width(levels))
