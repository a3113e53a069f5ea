"""Property and fuzz tests of the wire codec: round trips, truncation, mutation, garbage.

``decode`` must raise only :class:`PayloadError` (never IndexError, struct.error,
MemoryError...) and must never allocate more than a small multiple of its input,
whatever the header declares.
"""

from __future__ import annotations

import math
import random
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e3sfc_core.errors import PayloadError
from e3sfc_core.lowrank import LowRankBody, record_floats
from e3sfc_core.payload import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_QSGD_BUCKET,
    MAX_QSGD_LEVELS,
    VERSION,
    BundleBody,
    Codec,
    CorrectedBody,
    DenseBody,
    Direction,
    FloatType,
    Payload,
    QuantBody,
    SignBody,
    SparseBody,
    SyntheticBody,
    TernaryBody,
    decode,
    encode,
)

from .body_equality import assert_same_body

PEAK_LIMIT = 50 * 2**20
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROPS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------- strategies


def finite(ft: FloatType) -> st.SearchStrategy[float]:
    """Floats exactly representable in the wire dtype."""
    width = 16 if ft == FloatType.FLOAT16 else 32
    return st.floats(allow_nan=False, allow_infinity=False, width=width)


def f32_scalar() -> st.SearchStrategy[float]:
    return st.floats(allow_nan=False, allow_infinity=False, width=32)


dense_records = st.tuples(st.integers(1, 8), st.integers(1, 3), st.just(0))
lowrank_records = st.tuples(st.integers(3, 7), st.integers(3, 7)).flatmap(
    lambda rc: (
        st.tuples(st.just(rc[0]), st.just(rc[1]), st.integers(1, rc[0] * rc[1] // (rc[0] + rc[1]) - 1))
        if rc[0] * rc[1] // (rc[0] + rc[1]) > 1
        else st.tuples(st.just(rc[0]), st.just(rc[1]), st.just(1))
    )
)


def lowrank_layout(rng: random.Random) -> tuple[tuple[int, int, int], ...]:
    """A few dense and low-rank records (rank 1 of a 3..6 square is always smaller)."""
    out = []
    for _ in range(rng.randint(1, 3)):
        n = rng.randint(3, 6)
        out.append((n, n, 1) if rng.random() < 0.5 else (rng.randint(1, 8), 1, 0))
    return tuple(out)


@st.composite
def bodies(draw: st.DrawFn, codec: Codec, ft: FloatType) -> tuple[int, object]:
    """``(numel, body)`` for ``codec``, small sizes, every field valid."""
    numel = draw(st.integers(min_value=0, max_value=40))
    if codec in (Codec.DENSE, Codec.WEIGHTS):
        values = draw(st.lists(finite(ft), min_size=numel, max_size=numel))
        return numel, DenseBody(torch.tensor(values, dtype=torch.float32).reshape(numel))
    if codec == Codec.SYNTHETIC:
        n = draw(st.integers(1, 3))
        dims = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=4)))
        classes = draw(st.integers(1, 4))
        per = 1
        for d in dims:
            per *= d
        xs = draw(st.lists(finite(ft), min_size=n * per, max_size=n * per))
        ys = draw(st.lists(finite(ft), min_size=n * classes, max_size=n * classes))
        layers = draw(st.one_of(st.none(), st.lists(f32_scalar(), min_size=1, max_size=5)))
        body = SyntheticBody(
            scale=draw(f32_scalar()),
            inputs=torch.tensor(xs, dtype=torch.float32).reshape(n, *dims),
            labels=torch.tensor(ys, dtype=torch.float32).reshape(n, classes),
            layer_scales=None if layers is None else torch.tensor(layers, dtype=torch.float32),
        )
        return numel, body
    if codec in (Codec.CORRECTED, Codec.CORRECTED_TAGGED):
        _, synthetic = draw(st.one_of(bodies(Codec.SYNTHETIC, ft), st.just((0, None))))
        inner = Codec.TOPK if codec == Codec.CORRECTED else draw(st.sampled_from([Codec.TOPK, Codec.STC]))
        numel, correction = draw(bodies(inner, ft))
        return numel, CorrectedBody(synthetic, correction)
    if codec == Codec.BUNDLE:
        count = draw(st.integers(1, 3))
        weights = tuple(
            draw(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=count, max_size=count))
        )
        return numel, BundleBody(weights, tuple(_dense_payload(numel, i) for i in range(count)))
    if codec in (Codec.TOPK, Codec.STC):
        numel = draw(st.one_of(st.integers(1, 40), st.integers(41, 5000)))  # dense and sparse
        idx = sorted(draw(st.sets(st.integers(0, numel - 1), max_size=min(numel, 64))))
        k = len(idx)
        if codec == Codec.TOPK:
            values = draw(st.lists(finite(ft), min_size=k, max_size=k))
            return numel, SparseBody(
                torch.tensor(idx, dtype=torch.int64), torch.tensor(values, dtype=torch.float32)
            )
        signs = draw(st.lists(st.booleans(), min_size=k, max_size=k))
        return numel, TernaryBody(
            torch.tensor(idx, dtype=torch.int64), torch.tensor(signs, dtype=torch.bool), draw(f32_scalar())
        )
    if codec == Codec.LOWRANK:
        layout = draw(st.lists(st.one_of(dense_records, lowrank_records), max_size=4))
        floats = sum(record_floats(*rec) for rec in layout)
        values = draw(st.lists(finite(ft), min_size=floats, max_size=floats))
        body = LowRankBody(tuple(layout), torch.tensor(values, dtype=torch.float32).reshape(floats))
        return sum(r * c for r, c, _ in layout), body
    if codec == Codec.SIGN:
        signs = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
        return numel, SignBody(torch.tensor(signs, dtype=torch.bool), draw(f32_scalar()))
    levels = draw(st.integers(1, MAX_QSGD_LEVELS))
    numel = draw(st.one_of(st.just(numel), st.integers(41, 400)))
    level = st.integers(-levels, levels)
    q = draw(st.lists(st.one_of(st.just(0), level), min_size=numel, max_size=numel))
    if draw(st.booleans()):  # mostly zeros, so the gamma code wins
        q = [x if i % 17 == 0 else 0 for i, x in enumerate(q)]
    bucket = draw(st.one_of(st.integers(1, 64), st.just(MAX_QSGD_BUCKET)))
    n_buckets = -(-numel // bucket)
    norms = draw(st.lists(f32_scalar(), min_size=n_buckets, max_size=n_buckets))
    body = QuantBody(
        torch.tensor(norms, dtype=torch.float32), levels, torch.tensor(q, dtype=torch.int8), bucket
    )
    return numel, body


def _dense_payload(numel: int, seed: int) -> bytes:
    """A valid dense payload to put in a bundle."""
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    return encode(Payload(Codec.DENSE, Direction.UPLINK, 1, b"\0" * 8, numel, DenseBody(values)))


@st.composite
def payloads(draw: st.DrawFn) -> Payload:
    codec = draw(st.sampled_from(list(Codec)))
    ft = draw(st.sampled_from(list(FloatType)))
    numel, body = draw(bodies(codec, ft))
    return Payload(
        codec=codec,
        direction=draw(st.sampled_from(list(Direction))),
        server_round=draw(st.integers(0, 2**32 - 1)),
        base_digest=draw(st.binary(min_size=8, max_size=8)),
        numel=numel,
        body=body,  # type: ignore[arg-type]
        float_type=ft,
    )


def valid_pool(count: int = 132, seed: int = 1) -> list[bytes]:
    """Pre-encoded valid payloads of every codec and float width (fixed seed).

    The fuzz tests mutate these instead of drawing a payload per example: drawing
    tensors through Hypothesis costs far more than the decode under test.
    """
    rng = random.Random(seed)
    out = []
    for i in range(count):
        codec = list(Codec)[i % len(Codec)]
        ft = list(FloatType)[(i // len(Codec)) % 2]
        numel = rng.randint(1, 40)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        vals = (
            (torch.randn(numel, generator=g) * 10 ** rng.uniform(-3, 3))
            .to(torch.float16 if ft == FloatType.FLOAT16 else torch.float32)
            .float()
        )
        body: object
        if codec in (Codec.DENSE, Codec.WEIGHTS):
            body = DenseBody(vals)
        elif codec == Codec.SYNTHETIC:
            body = _synthetic_body(rng, g, vals.dtype)
        elif codec in (Codec.CORRECTED, Codec.CORRECTED_TAGGED):
            idx = torch.tensor(sorted(rng.sample(range(numel), rng.randint(0, numel))), dtype=torch.int64)
            sparse = (
                SparseBody(idx, vals[: idx.numel()])
                if codec == Codec.CORRECTED or i % 2
                else TernaryBody(idx, vals[: idx.numel()] < 0, rng.uniform(0, 2))
            )
            body = CorrectedBody(_synthetic_body(rng, g, vals.dtype), sparse)
        elif codec in (Codec.TOPK, Codec.STC):
            span = numel if (i // 16) % 2 else 40 * numel  # dense (bitmap) and sparse (Rice)
            k = rng.randint(0, numel)
            idx = torch.tensor(sorted(rng.sample(range(span), k)), dtype=torch.int64)
            if codec == Codec.TOPK:
                body = SparseBody(idx, vals[: idx.numel()])
            else:
                body = TernaryBody(idx, vals[: idx.numel()] < 0, rng.uniform(0, 2))
        elif codec == Codec.SIGN:
            body = SignBody(vals < 0, rng.uniform(0, 2))
        elif codec == Codec.LOWRANK:
            layout = lowrank_layout(rng)
            floats = sum(record_floats(*rec) for rec in layout)
            low = torch.randn(floats, generator=g).to(vals.dtype).float()
            body = LowRankBody(layout, low)
            span = sum(r * c for r, c, _ in layout)
        elif codec == Codec.BUNDLE:
            inner = [_dense_payload(numel, i + j) for j in range(rng.randint(1, 3))]
            body = BundleBody(tuple(rng.uniform(-2, 2) for _ in inner), tuple(inner))
        else:
            levels = rng.randint(1, MAX_QSGD_LEVELS)
            q = torch.randint(-levels, levels + 1, (numel,), generator=g, dtype=torch.int8)
            if (i // 16) % 2:  # mostly zeros (gamma) or not (packed)
                q[torch.rand(numel, generator=g) < 0.9] = 0
            bucket = rng.randint(1, 16)
            norms = torch.rand(-(-numel // bucket), generator=g) * 10
            body = QuantBody(norms, levels, q, bucket)
        n = span if codec in (Codec.TOPK, Codec.STC, Codec.LOWRANK) else numel
        p = Payload(codec, Direction(i % 2), rng.randrange(2**32), rng.randbytes(8), n, body, ft)  # type: ignore[arg-type]
        out.append(encode(p))
    return out


def _synthetic_body(rng: random.Random, g: torch.Generator, dtype: torch.dtype) -> SyntheticBody:
    n, dims, classes = (
        rng.randint(1, 3),
        tuple(rng.randint(1, 3) for _ in range(rng.randint(1, 4))),
        rng.randint(1, 4),
    )
    x = torch.randn(n, *dims, generator=g).to(dtype)
    return SyntheticBody(rng.uniform(-5, 5), x, torch.randn(n, classes, generator=g))


POOL = valid_pool()


def body_length(p: Payload) -> int:
    """Body size computed independently from the spec table."""
    w = 2 if p.float_type == FloatType.FLOAT16 else 4
    b = p.body
    if isinstance(b, DenseBody):
        return w * p.numel
    if isinstance(b, SyntheticBody):
        ndim = b.inputs.ndim - 1
        layers = 0 if b.layer_scales is None else 4 * b.layer_scales.numel()
        return 4 + 2 + 2 + 1 + 3 + 4 * ndim + layers + w * (b.inputs.numel() + b.labels.numel())
    if isinstance(b, CorrectedBody):
        batch = 0 if b.synthetic is None else body_length(replace(p, body=b.synthetic))
        return 4 + (p.codec == Codec.CORRECTED_TAGGED) + batch + body_length(replace(p, body=b.correction))
    if isinstance(b, BundleBody):
        return 2 + sum(12 + len(inner) for inner in b.payloads)
    if isinstance(b, SparseBody):
        return 6 + w * b.indices.numel() + ref_positions_bytes(b.indices.tolist(), p.numel)
    if isinstance(b, TernaryBody):
        k = b.indices.numel()
        return 10 + (k + 7) // 8 + ref_positions_bytes(b.indices.tolist(), p.numel)
    if isinstance(b, SignBody):
        return 4 + (p.numel + 7) // 8
    if isinstance(b, LowRankBody):
        return 4 + 10 * len(b.layout) + w * sum(r * c if k == 0 else k * (r + c) for r, c, k in b.layout)
    assert isinstance(b, QuantBody)
    return 6 + 4 * b.norms.numel() + ref_levels_bytes(b.q.tolist(), b.levels)


def ref_positions_bytes(idx: list[int], numel: int) -> int:
    """Positions section size from the spec, in plain Python: the best Rice code of the
    gaps or the bitmap, whichever is smaller."""
    gaps = [j - i - 1 for i, j in zip([-1, *idx], idx, strict=False)]
    rice = min(sum(g >> b for g in gaps) + len(gaps) * (1 + b) for b in range(31))
    return min((rice + 7) // 8, (numel + 7) // 8)


def ref_levels_bytes(q: list[int], levels: int) -> int:
    """Levels section size from the spec (v5): gamma-coded runs, magnitudes and signs
    (with the u32 count), Rice-coded runs, positions and values of the magnitudes above
    1 and signs (with the two counts and three parameters) or packed fields, whichever
    is smallest."""
    nz = [i for i, x in enumerate(q) if x]
    runs = [j - i for i, j in zip([-1, *nz], nz, strict=False)]
    mags = [abs(q[i]) for i in nz]
    gamma = sum(2 * v.bit_length() - 1 for v in runs + mags) + len(nz)

    def rice(values: list[int]) -> int:
        return min(sum(v >> b for v in values) + len(values) * (1 + b) for b in range(31))

    big = [j for j, m in enumerate(mags) if m > 1]
    big_gaps = [j - i - 1 for i, j in zip([-1, *big], big, strict=False)]
    rice_bits = rice([r - 1 for r in runs]) + rice(big_gaps) + rice([mags[j] - 2 for j in big]) + len(nz)
    width = math.ceil(math.log2(2 * levels + 1))
    return min(4 + (gamma + 7) // 8, 11 + (rice_bits + 7) // 8, (len(q) * width + 7) // 8)


def assert_same(actual: Payload, expected: Payload) -> None:
    assert (actual.codec, actual.direction, actual.server_round, actual.base_digest) == (
        expected.codec,
        expected.direction,
        expected.server_round,
        expected.base_digest,
    )
    assert (actual.numel, actual.float_type) == (expected.numel, expected.float_type)
    assert_same_body(actual.body, expected.body)


class PeakTracker:
    """Largest tracemalloc peak seen across many ``decode`` calls.

    Tracing is switched on only around ``decode`` itself: tracing Hypothesis' own
    bookkeeping would make the 2000-example runs many times slower.
    """

    def __init__(self) -> None:
        self.worst = 0
        self.calls = 0

    def decode_only_payload_error(self, data: bytes) -> Payload | None:
        tracemalloc.start()
        try:
            result: Payload | None = decode(data)
        except Exception as exc:  # noqa: BLE001 - the point is to see every exception type
            assert isinstance(exc, PayloadError), f"{type(exc).__name__}: {exc}"
            result = None
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        self.worst = max(self.worst, peak)
        self.calls += 1
        return result


@pytest.fixture(scope="module")
def tracker() -> Iterator[PeakTracker]:
    t = PeakTracker()
    yield t
    assert t.calls > 0
    assert t.worst < PEAK_LIMIT


# ---------------------------------------------------------------------- round trips


@PROPS
@given(p=payloads())
def test_roundtrip_every_codec_and_float_width(p: Payload) -> None:
    # Execute
    data = encode(p)
    back = decode(data)

    # Assert
    assert_same(back, p)
    assert len(data) == HEADER_SIZE + body_length(p)
    assert encode(back) == data


@PROPS
@given(p=payloads(), data=st.data())
def test_any_truncation_raises_payload_error(p: Payload, data: st.DataObject) -> None:
    # Prepare
    raw = encode(p)
    cut = data.draw(st.integers(0, len(raw) - 1))

    # Execute / Assert
    with pytest.raises(PayloadError):
        decode(raw[:cut])


@PROPS
@given(p=payloads(), data=st.data())
def test_truncation_with_patched_body_length_raises_payload_error(p: Payload, data: st.DataObject) -> None:
    # Prepare: drop body bytes but keep the header self-consistent
    raw = bytearray(encode(p))
    if len(raw) == HEADER_SIZE:
        return
    cut = data.draw(st.integers(HEADER_SIZE, len(raw) - 1))
    short = raw[:cut]
    short[24:28] = (cut - HEADER_SIZE).to_bytes(4, "little")

    # Execute / Assert
    with pytest.raises(PayloadError):
        decode(bytes(short))


# ---------------------------------------------------------------------------- fuzz


@FUZZ
@given(blob=st.binary(max_size=256))
def test_random_bytes_raise_only_payload_error(tracker: PeakTracker, blob: bytes) -> None:
    # Execute / Assert
    tracker.decode_only_payload_error(blob)
    assert tracker.worst < PEAK_LIMIT


@FUZZ
@given(
    direction=st.integers(0, 2),
    codec=st.integers(0, 10),
    ftype=st.integers(0, 3),
    numel=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    body=st.binary(max_size=200),
)
def test_random_bodies_behind_a_valid_header(
    tracker: PeakTracker, direction: int, codec: int, ftype: int, numel: int, body: bytes
) -> None:
    # Prepare
    data = HEADER.pack(MAGIC, VERSION, direction, codec, ftype, 3, b"\0" * 8, numel, len(body)) + body

    # Execute
    result = tracker.decode_only_payload_error(data)

    # Assert: anything accepted re-encodes to the same bytes (canonical encoding)
    if result is not None:
        again = bytearray(encode(result))
        assert bytes(again) == data


@FUZZ
@given(raw=st.sampled_from(POOL).map(bytearray), data=st.data())
def test_bit_flips_raise_only_payload_error(
    tracker: PeakTracker, raw: bytearray, data: st.DataObject
) -> None:
    # Prepare
    for _ in range(data.draw(st.integers(1, 4))):
        bit = data.draw(st.integers(0, 8 * len(raw) - 1))
        raw[bit // 8] ^= 1 << (bit % 8)

    # Execute / Assert
    tracker.decode_only_payload_error(bytes(raw))


@FUZZ
@given(raw=st.sampled_from(POOL).map(bytearray), data=st.data())
def test_byte_mutations_raise_only_payload_error(
    tracker: PeakTracker, raw: bytearray, data: st.DataObject
) -> None:
    # Prepare: overwrite, insert or delete a few bytes, sometimes fixing the body length
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "insert", "delete", "u32"]))
        pos = data.draw(st.integers(0, len(raw)))
        if op == "set" and pos < len(raw):
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and pos < len(raw):
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        elif op == "u32" and pos + 4 <= len(raw):
            raw[pos : pos + 4] = data.draw(st.sampled_from([0, 1, 2**16, 2**31 - 1, 2**32 - 1])).to_bytes(
                4, "little"
            )
    if data.draw(st.booleans()) and len(raw) >= HEADER_SIZE:
        raw[24:28] = (len(raw) - HEADER_SIZE).to_bytes(4, "little")

    # Execute / Assert
    tracker.decode_only_payload_error(bytes(raw))


@FUZZ
@given(
    version=st.sampled_from([1, 2]),
    codec=st.sampled_from([Codec.TOPK, Codec.STC, Codec.QSGD, Codec.BUNDLE]),
    numel=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    body=st.binary(max_size=200),
)
def test_random_legacy_bodies_raise_only_payload_error(
    tracker: PeakTracker, version: int, codec: Codec, numel: int, body: bytes
) -> None:
    # Prepare: the v1/v2 layouts that v3 replaced still decode
    data = HEADER.pack(MAGIC, version, 0, int(codec), 1, 3, b"\0" * 8, numel, len(body)) + body

    # Execute / Assert
    tracker.decode_only_payload_error(data)


@PROPS
@given(p=payloads(), data=st.data())
def test_mutated_v3_sections_raise_only_payload_error(p: Payload, data: st.DataObject) -> None:
    # Prepare: flip bits in the coded sections of the v3 codecs, keeping the header valid
    raw = bytearray(encode(p))
    if p.codec not in (Codec.TOPK, Codec.STC, Codec.QSGD, Codec.LOWRANK) or len(raw) == HEADER_SIZE:
        return
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(8 * HEADER_SIZE, 8 * len(raw) - 1))
        raw[bit // 8] ^= 1 << (bit % 8)

    # Execute / Assert: an error, or a valid payload that re-encodes to the same bytes
    try:
        back = decode(bytes(raw))
    except PayloadError:
        return
    assert encode(back) == bytes(raw)


def test_pool_is_valid_and_covers_every_codec() -> None:
    # Execute
    decoded = [decode(raw) for raw in POOL]

    # Assert
    assert {(p.codec, p.float_type) for p in decoded} == {(c, f) for c in Codec for f in FloatType}
    assert all(encode(p) == raw for p, raw in zip(decoded, POOL, strict=True))
    mode_offset = {Codec.TOPK: 4, Codec.STC: 8, Codec.QSGD: 1}  # both modes of each code
    for codec, offset in mode_offset.items():
        modes = {raw[HEADER_SIZE + offset] for raw in POOL if raw[6] == codec}
        assert modes == {0, 1}, codec.name


def test_decoding_huge_declarations_stays_small(tracker: PeakTracker) -> None:
    # Prepare: every codec with the largest numel and a 9-byte body
    blobs = [
        HEADER.pack(MAGIC, VERSION, 0, c, f, 0, b"\0" * 8, 2**31 - 1, 9) + b"\xff" * 9
        for c in range(1, 10)
        for f in (1, 2)
    ]

    # Execute
    for blob in blobs:
        tracker.decode_only_payload_error(blob)

    # Assert
    assert tracker.worst < PEAK_LIMIT
