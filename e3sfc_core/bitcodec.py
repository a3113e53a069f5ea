"""Bit streams and the integer codes of wire format v3: unary, Rice and Elias-gamma.

Why a module of its own: the baselines' positions and QSGD levels cost a few bits each,
so they need variable-length codes; these must stay vectorised (NumPy, no Python loop
per symbol) and safe on hostile input. This module knows nothing about payloads.

Conventions (the wire format's spec refers to them):

* Bit ``i`` of a stream is bit ``i % 8`` (least significant first) of byte ``i // 8``,
  the order of the sign bits. A stream is padded with zero bits to a whole byte.
* A ``w``-bit field stores its value least significant bit first.
* ``unary(q)``: ``q`` zero bits, then a one bit.
* ``rice_b(g)`` for ``g >= 0``: ``unary(g >> b)`` and the ``b``-bit field ``g mod 2^b``.
* ``gamma(v)`` for ``v >= 1`` (Elias-gamma), ``L = bit_length(v)``: ``unary(L - 1)`` and
  the ``(L - 1)``-bit field ``v - 2^(L-1)``.
* A sequence of numbers coded with one code is written in two sections: first the
  unary prefixes of all numbers, then all their fields. The bit count is that of the
  interleaved textbook code; the order lets the reader find every prefix with one
  ``flatnonzero`` instead of parsing symbol by symbol.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import PayloadError

MAX_FIELD_BITS = 52  # fields are summed in float64 when read: exact below 2**53

IntArray = np.ndarray[Any, np.dtype[np.int64]]


def bit_lengths(values: IntArray) -> IntArray:
    """``int.bit_length`` of each value (``values >= 0``, below 2**53)."""
    v = np.asarray(values, dtype=np.int64)
    _, exp = np.frexp(v.astype(np.float64))
    return exp.astype(np.int64)


def rice_bits(values: IntArray, b: int) -> int:
    """Bits of ``rice_b`` of every value, without writing them."""
    v = np.asarray(values, dtype=np.int64)
    return int(np.sum(v >> b)) + v.size * (1 + b)


def gamma_bits(values: IntArray) -> int:
    """Bits of ``gamma`` of every value (each ``>= 1``), without writing them."""
    return int(np.sum(2 * bit_lengths(values) - 1))


def best_rice_parameter(values: IntArray, max_b: int) -> int:
    """The smallest ``b`` in ``0..max_b`` that minimises :func:`rice_bits`.

    Starts from ``floor(log2(mean))`` and walks downhill: the bit count is convex in
    ``b`` (each step up adds ``len`` bits and saves ``sum(ceil((g >> b) / 2))``, which
    shrinks with ``b``), so the walk ends at the global minimum in a few evaluations.
    """
    v = np.asarray(values, dtype=np.int64)
    if v.size == 0:
        return 0
    mean = float(np.sum(v)) / v.size
    b = min(max_b, max(0, int(np.floor(np.log2(mean))) if mean >= 1.0 else 0))
    cost = rice_bits(v, b)
    while b > 0 and (down := rice_bits(v, b - 1)) <= cost:
        b, cost = b - 1, down
    while b < max_b and (up := rice_bits(v, b + 1)) < cost:
        b, cost = b + 1, up
    return b


class BitWriter:
    """Appends bit sections; :meth:`getvalue` packs them into zero-padded bytes."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray[Any, np.dtype[np.uint8]]] = []
        self.nbits = 0

    def _add(self, bits: np.ndarray[Any, Any]) -> None:
        part = np.asarray(bits, dtype=np.uint8)
        self._parts.append(part)
        self.nbits += part.size

    def flags(self, flags: np.ndarray[Any, Any]) -> None:
        """One bit per entry (true: 1)."""
        self._add(np.asarray(flags).astype(bool))

    def fields(self, values: IntArray, width: int) -> None:
        """Each value as a ``width``-bit field (values must fit)."""
        v = np.asarray(values, dtype=np.int64)
        if width == 0 or v.size == 0:
            return
        self._add(((v[:, None] >> np.arange(width, dtype=np.int64)) & 1).reshape(-1))

    def varfields(self, values: IntArray, widths: IntArray) -> None:
        """Value ``i`` as a ``widths[i]``-bit field."""
        v, w = np.asarray(values, dtype=np.int64), np.asarray(widths, dtype=np.int64)
        total = int(np.sum(w))
        if total == 0:
            return
        owner = np.repeat(np.arange(v.size), w)
        shift = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(w) - w, w)
        self._add((v[owner] >> shift) & 1)

    def unary(self, values: IntArray) -> None:
        """``unary`` of every value (each ``>= 0``)."""
        v = np.asarray(values, dtype=np.int64)
        if v.size == 0:
            return
        ends = np.cumsum(v + 1) - 1
        bits = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
        bits[ends] = 1
        self._add(bits)

    def rice(self, values: IntArray, b: int) -> None:
        """``rice_b`` of every value: the unary section, then the ``b``-bit fields."""
        v = np.asarray(values, dtype=np.int64)
        self.unary(v >> b)
        self.fields(v & ((1 << b) - 1), b)

    def gamma(self, values: IntArray) -> None:
        """``gamma`` of every value (each ``>= 1``): the unary section, then the fields."""
        v = np.asarray(values, dtype=np.int64)
        tail = bit_lengths(v) - 1
        self.unary(tail)
        self.varfields(v - (np.int64(1) << tail), tail)

    def getvalue(self) -> bytes:
        if not self._parts:
            return b""
        return np.packbits(np.concatenate(self._parts), bitorder="little").tobytes()


class BitReader:
    """Bounds-checked reader of a stream written by :class:`BitWriter`.

    Every method checks that its bits exist and that decoded values are in range
    before building anything proportional to them, and raises only :class:`PayloadError`.
    """

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        raw = np.frombuffer(data, dtype=np.uint8)
        self.bits = np.unpackbits(raw, bitorder="little")
        self.pos, self.what = 0, what

    def _fail(self, problem: str) -> PayloadError:
        return PayloadError(f"{self.what}: {problem} (at bit {self.pos} of {self.bits.size})")

    def _take(self, count: int, part: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
        if count < 0 or count > self.bits.size - self.pos:
            raise self._fail(f"stream too short for {part}: needs {count} more bits")
        chunk = self.bits[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def flags(self, count: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return self._take(count, "flag bits").astype(bool)

    def fields(self, count: int, width: int) -> IntArray:
        if not 0 <= width <= MAX_FIELD_BITS:
            raise self._fail(f"field width {width} out of range")
        if width == 0:
            self._take(0, "fields")
            return np.zeros(count, dtype=np.int64)
        chunk = self._take(count * width, "fields").reshape(count, width).astype(np.int64)
        return np.sum(chunk << np.arange(width, dtype=np.int64), axis=1)

    def varfields(self, widths: IntArray) -> IntArray:
        w = np.asarray(widths, dtype=np.int64)
        if w.size and (int(w.min()) < 0 or int(w.max()) > MAX_FIELD_BITS):
            raise self._fail("field width out of range")
        total = int(np.sum(w))
        chunk = self._take(total, "fields").astype(np.float64)
        if total == 0:
            return np.zeros(w.size, dtype=np.int64)
        owner = np.repeat(np.arange(w.size), w)
        shift = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(w) - w, w)
        sums = np.bincount(owner, weights=chunk * np.exp2(shift), minlength=w.size)
        return sums.astype(np.int64)

    def unary(self, count: int, max_value: int) -> IntArray:
        """``count`` unary numbers, each at most ``max_value`` (else the stream is refused)."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        window = self.bits[self.pos : self.pos + count * (max_value + 1)]
        ones = np.flatnonzero(window)[:count]
        if ones.size < count:
            raise self._fail(f"{count} unary codes below {max_value + 1} do not fit")
        values = np.diff(ones, prepend=-1) - 1
        if int(values.max()) > max_value:
            raise self._fail(f"unary value {int(values.max())} exceeds {max_value}")
        self.pos += int(ones[-1]) + 1
        return values.astype(np.int64)

    def rice(self, count: int, b: int, max_value: int) -> IntArray:
        """``count`` Rice-coded numbers, each at most ``max_value``."""
        if not 0 <= b <= MAX_FIELD_BITS:
            raise self._fail(f"Rice parameter {b} out of range")
        high = self.unary(count, max_value >> b)
        values = (high << b) | self.fields(count, b)
        if values.size and int(values.max()) > max_value:
            raise self._fail(f"Rice value exceeds {max_value}")
        return values

    def gamma(self, count: int, max_value: int) -> IntArray:
        """``count`` Elias-gamma numbers, each in ``1..max_value``."""
        tail = self.unary(count, max(0, max_value.bit_length() - 1))
        values = (np.int64(1) << tail) + self.varfields(tail)
        if values.size and int(values.max()) > max_value:
            raise self._fail(f"Elias-gamma value exceeds {max_value}")
        return values

    def finish(self) -> None:
        """The stream must end here: fewer than 8 bits left, all of them zero."""
        rest = self.bits.size - self.pos
        if rest >= 8:
            raise self._fail(f"{rest // 8} trailing bytes after the codes")
        if np.any(self.bits[self.pos :]):
            raise self._fail("padding bits after the codes are not zero")
