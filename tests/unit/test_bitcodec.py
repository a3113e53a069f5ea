"""Bit streams and integer codes (e3sfc_core.bitcodec) and the codes built on them
(e3sfc_core.compact): round trips, bit counts against the textbook formulas, bounds,
and hostile streams that must raise only PayloadError."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e3sfc_core import compact
from e3sfc_core.bitcodec import (
    BitReader,
    BitWriter,
    best_rice_parameter,
    bit_lengths,
    gamma_bits,
    rice_bits,
)
from e3sfc_core.errors import PayloadError

PROPS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
small_ints = st.lists(st.integers(0, 5000), max_size=60)


def written(step: Callable[[BitWriter], None]) -> bytes:
    w = BitWriter()
    step(w)
    return w.getvalue()


# ------------------------------------------------------------------------ layout


def test_bits_are_least_significant_first() -> None:
    # Execute
    data = written(lambda w: w.flags(np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1])))

    # Assert
    assert data == bytes([0b0000_0001, 0b0000_0010])


def test_textbook_codes() -> None:
    # Execute: unary(2) = 001; rice_1(5) = unary(2) + field 1 = 001 1; gamma(5) = 00 1 + 01
    unary = written(lambda w: w.unary(np.array([2])))
    rice = written(lambda w: w.rice(np.array([5]), 1))
    gamma = written(lambda w: w.gamma(np.array([5])))

    # Assert
    assert unary == bytes([0b100])
    assert rice == bytes([0b1100])
    assert gamma == bytes([0b01100])  # prefix 0,0,1 then the tail 01 (LSB first: 1, 0)


def test_bit_lengths() -> None:
    values = np.array([0, 1, 2, 3, 4, 255, 256, 2**31 - 1, 2**31, 2**52 - 1])
    assert bit_lengths(values).tolist() == [int(v).bit_length() for v in values.tolist()]


# -------------------------------------------------------------------- round trips


@PROPS
@given(values=small_ints, b=st.integers(0, 14))
def test_rice_round_trip_and_bit_count(values: list[int], b: int) -> None:
    # Prepare
    v = np.array(values, dtype=np.int64)

    # Execute
    w = BitWriter()
    w.rice(v, b)
    r = BitReader(w.getvalue(), "test")
    back = r.rice(v.size, b, 5000)
    r.finish()

    # Assert
    assert back.tolist() == values
    assert w.nbits == rice_bits(v, b) == sum((x >> b) + 1 + b for x in values)


@PROPS
@given(values=st.lists(st.integers(1, 2**31 - 1), max_size=60))
def test_gamma_round_trip_and_bit_count(values: list[int]) -> None:
    # Prepare
    v = np.array(values, dtype=np.int64)

    # Execute
    w = BitWriter()
    w.gamma(v)
    r = BitReader(w.getvalue(), "test")
    back = r.gamma(v.size, 2**31 - 1)
    r.finish()

    # Assert
    assert back.tolist() == values
    assert w.nbits == gamma_bits(v) == sum(2 * x.bit_length() - 1 for x in values)


@PROPS
@given(
    values=st.lists(st.integers(0, 255), max_size=60), width=st.integers(8, 12), flags=st.lists(st.booleans())
)
def test_fields_and_flags_in_one_stream(values: list[int], width: int, flags: list[bool]) -> None:
    # Execute
    w = BitWriter()
    w.fields(np.array(values, dtype=np.int64), width)
    w.flags(np.array(flags, dtype=bool))
    r = BitReader(w.getvalue(), "test")
    got, got_flags = r.fields(len(values), width), r.flags(len(flags))
    r.finish()

    # Assert
    assert got.tolist() == values and got_flags.tolist() == flags


@PROPS
@given(values=small_ints)
def test_best_rice_parameter_is_the_smallest_minimiser(values: list[int]) -> None:
    # Prepare
    v = np.array(values, dtype=np.int64)
    costs = [rice_bits(v, b) for b in range(31)]

    # Execute
    b = best_rice_parameter(v, 30)

    # Assert
    assert costs[b] == min(costs) and b == costs.index(min(costs))


# ----------------------------------------------------------------- hostile streams


@PROPS
@given(
    blob=st.binary(max_size=64), count=st.integers(0, 100), b=st.integers(0, 40), cap=st.integers(0, 2**31)
)
def test_garbage_streams_raise_only_payload_error(blob: bytes, count: int, b: int, cap: int) -> None:
    for read in (
        lambda r: r.rice(count, b, cap),
        lambda r: r.gamma(count, max(cap, 1)),
        lambda r: r.unary(count, cap),
        lambda r: r.fields(count, b),
        lambda r: r.flags(count),
    ):
        r = BitReader(blob, "garbage")
        try:
            read(r)
            r.finish()
        except PayloadError:
            pass


def test_reader_rules() -> None:
    # Execute / Assert
    with pytest.raises(PayloadError, match="exceeds"):
        BitReader(bytes([0b10_0001]), "t").unary(2, 2)  # values 0, 4: 4 > 2
    with pytest.raises(PayloadError, match="fit"):
        BitReader(bytes([0b1]), "t").unary(2, 10)
    with pytest.raises(PayloadError, match="padding"):
        r = BitReader(bytes([0b11]), "t")
        r.unary(1, 0)
        r.finish()
    with pytest.raises(PayloadError, match="trailing"):
        r = BitReader(bytes([0b1, 0]), "t")
        r.unary(1, 0)
        r.finish()
    with pytest.raises(PayloadError, match="short"):
        BitReader(b"\x00", "t").fields(2, 5)


# -------------------------------------------------------------------- compact codes


@PROPS
@given(data=st.data(), numel=st.integers(0, 3000))
def test_positions_round_trip_within_the_bound(data: st.DataObject, numel: int) -> None:
    # Prepare
    idx = sorted(data.draw(st.sets(st.integers(0, max(numel - 1, 0)), max_size=min(numel, 80))))
    arr = np.array(idx, dtype=np.int64)

    # Execute
    mode, b, section = compact.encode_positions(arr, numel)
    back = compact.decode_positions(memoryview(section), mode, b, len(idx), numel)

    # Assert
    assert back.tolist() == idx
    assert len(section) <= compact.positions_bytes_bound(numel, len(idx))


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000, 55_210])
def test_positions_bound_is_exact_for_none_and_all(numel: int) -> None:
    for k in (0, numel):
        mode, b, section = compact.encode_positions(np.arange(k), numel)
        assert len(section) == compact.positions_bytes_bound(numel, k)
        assert mode == compact.MODE_BITMAP or k == 0


@pytest.mark.parametrize("numel", [100, 55_210, 300_000])
def test_positions_bound_is_monotone_in_k(numel: int) -> None:
    sizes = [compact.positions_bytes_bound(numel, k) for k in range(0, numel + 1, max(1, numel // 997))]
    assert sizes == sorted(sizes)


@PROPS
@given(data=st.data(), levels=st.integers(1, 127), numel=st.integers(0, 600))
def test_levels_round_trip_within_the_bound(data: st.DataObject, levels: int, numel: int) -> None:
    # Prepare
    density = data.draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(-levels, levels + 1, numel) * (rng.random(numel) < density)

    # Execute
    mode, section = compact.encode_levels(q, levels)
    back = compact.decode_levels(memoryview(section), mode, levels, numel)

    # Assert
    assert back.tolist() == q.tolist()
    assert len(section) <= compact.levels_bytes_bound(numel, levels)
