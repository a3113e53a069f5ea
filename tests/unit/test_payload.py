"""Wire codec v2 (e3sfc_core.payload): golden vectors and every decode rule.

The golden file ``tests/data/payload_v2_golden.json`` is the frozen byte layout of
format v2; ``payload_v1_golden.json`` is the previous format's, which must still decode.
The tests compare against the stored files and never rewrite them; regenerate the
current one only on purpose (a format change must bump ``VERSION``)::

    .venv/bin/python tests/unit/test_payload.py --regenerate
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch

from e3sfc_core.errors import PayloadError, UnsupportedVersion
from e3sfc_core.payload import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_NUMEL,
    VERSION,
    BundleBody,
    Codec,
    DenseBody,
    Direction,
    FloatType,
    Payload,
    QuantBody,
    SignBody,
    SparseBody,
    SyntheticBody,
    TernaryBody,
    bundle_size,
    decode,
    encode,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "payload_v2_golden.json"
GOLDEN_V1 = Path(__file__).resolve().parents[1] / "data" / "payload_v1_golden.json"
DIGEST = bytes(range(1, 9))
F32, F16 = FloatType.FLOAT32, FloatType.FLOAT16


# ------------------------------------------------------------------------ helpers


def make(
    codec: Codec,
    body: object,
    numel: int,
    *,
    float_type: FloatType = F32,
    direction: Direction = Direction.UPLINK,
    server_round: int = 7,
    digest: bytes = DIGEST,
) -> Payload:
    return Payload(
        codec=codec,
        direction=direction,
        server_round=server_round,
        base_digest=digest,
        numel=numel,
        body=body,  # type: ignore[arg-type]
        float_type=float_type,
    )


def assert_payload_equal(actual: Payload, expected: Payload) -> None:
    """Field-by-field equality (tensors compared exactly, dtype-insensitively)."""
    assert (actual.codec, actual.direction, actual.server_round) == (
        expected.codec,
        expected.direction,
        expected.server_round,
    )
    assert (actual.base_digest, actual.numel, actual.float_type) == (
        expected.base_digest,
        expected.numel,
        expected.float_type,
    )
    a, e = actual.body, expected.body
    assert type(a) is type(e)
    for name, value in vars(e).items():
        got = getattr(a, name)
        if isinstance(value, torch.Tensor):
            assert tuple(got.shape) == tuple(value.shape), name
            if value.dtype.is_floating_point:
                torch.testing.assert_close(got.float(), value.float(), rtol=0, atol=0)
            else:
                assert torch.equal(got.long(), value.long()), name
        else:
            assert got == value, name


def golden_payloads() -> dict[str, Payload]:
    """One small payload per codec (and float width) with fixed, exactly representable values."""
    return {
        "dense_f32": make(Codec.DENSE, DenseBody(torch.tensor([1.0, -2.5, 0.125, 3e-3])), 4),
        "dense_f16": make(
            Codec.DENSE, DenseBody(torch.tensor([1.0, -2.5, 0.125, 65504.0])), 4, float_type=F16
        ),
        "weights_f32": make(
            Codec.WEIGHTS,
            DenseBody(torch.tensor([0.5, -0.25, 4.0])),
            3,
            direction=Direction.DOWNLINK,
            server_round=0,
        ),
        "synthetic_f32": make(
            Codec.SYNTHETIC,
            SyntheticBody(
                scale=-0.75,
                inputs=torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]),
                labels=torch.tensor([[0.5, -1.5, 2.0]]),
            ),
            1234,
        ),
        "synthetic_f16": make(
            Codec.SYNTHETIC,
            SyntheticBody(
                scale=2.0,
                inputs=torch.tensor([[0.5, -1.0], [2.0, 0.25]]),
                labels=torch.tensor([[1.0, 0.0], [-0.5, 0.75]]),
            ),
            99,
            float_type=F16,
            direction=Direction.DOWNLINK,
        ),
        "synthetic_layers_f32": make(
            Codec.SYNTHETIC,
            SyntheticBody(
                scale=1.0,
                inputs=torch.tensor([[1.5, -0.5]]),
                labels=torch.tensor([[0.25, 0.75]]),
                layer_scales=torch.tensor([0.5, -2.0, 0.0]),
            ),
            17,
        ),
        "topk_f32": make(
            Codec.TOPK,
            SparseBody(indices=torch.tensor([0, 5, 9]), values=torch.tensor([1.5, -2.0, 0.25])),
            10,
        ),
        "stc": make(
            Codec.STC,
            TernaryBody(
                indices=torch.tensor([1, 2, 4, 8, 16, 17, 30, 31, 40]),
                negative=torch.tensor([True, False, False, True, True, False, False, False, True]),
                magnitude=0.375,
            ),
            41,
        ),
        "sign": make(
            Codec.SIGN,
            SignBody(
                negative=torch.tensor([True, False, True, True, False, False, False, True, True, False]),
                scale=0.5,
            ),
            10,
        ),
        "qsgd": make(
            Codec.QSGD,
            QuantBody(norm=3.5, levels=4, q=torch.tensor([0, 4, -4, 1, -1, 2], dtype=torch.int8)),
            6,
        ),
        "bundle": make(
            Codec.BUNDLE,
            BundleBody(
                weights=(0.75, -0.125),
                payloads=(
                    encode(make(Codec.DENSE, DenseBody(torch.tensor([1.0, -2.0, 0.5])), 3)),
                    encode(make(Codec.TOPK, SparseBody(torch.tensor([2]), torch.tensor([4.0])), 3)),
                ),
            ),
            3,
            direction=Direction.DOWNLINK,
        ),
    }


def write_golden(path: Path = GOLDEN) -> None:
    """Deliberate regeneration only (see module docstring)."""
    vectors = {}
    for name, p in golden_payloads().items():
        data = encode(p)
        vectors[name] = {"codec": p.codec.name, "length": len(data), "hex": data.hex()}
    doc = {"format_version": VERSION, "header_size": HEADER_SIZE, "vectors": vectors}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def valid_bytes(name: str = "dense_f32") -> bytes:
    return encode(golden_payloads()[name])


def header(
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    direction: int = 0,
    codec: int = Codec.DENSE,
    ftype: int = F32,
    server_round: int = 1,
    numel: int = 0,
    body_len: int | None = None,
    body: bytes = b"",
) -> bytes:
    """Hand-made header + body (``body_len`` defaults to the real body length)."""
    n = len(body) if body_len is None else body_len
    return (
        HEADER.pack(magic, version, direction, int(codec), int(ftype), server_round, DIGEST, numel, n) + body
    )


def synthetic_body(
    *,
    scale: float = 1.0,
    n: int = 1,
    n_classes: int = 2,
    dims: tuple[int, ...] = (2,),
    values: list[float] | None = None,
) -> bytes:
    count = n * (math.prod(dims) + n_classes)
    values = [0.5] * count if values is None else values
    return (
        struct.pack("<fHHBxH", scale, n, n_classes, len(dims), 0)
        + struct.pack(f"<{len(dims)}I", *dims)
        + struct.pack(f"<{len(values)}f", *values)
    )


def expect_error(data: bytes, *words: str, kind: type[PayloadError] = PayloadError) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        decode(data)
    assert type(info.value) is kind, f"expected {kind.__name__}, got {type(info.value).__name__}"
    message = str(info.value).lower()
    assert any(w.lower() in message for w in words), f"{message!r} mentions none of {words}"
    return info.value


# ------------------------------------------------------------------- golden vectors


def test_golden_file_covers_every_codec() -> None:
    # Prepare
    doc = json.loads(GOLDEN.read_text())

    # Execute
    codecs = {v["codec"] for v in doc["vectors"].values()}

    # Assert
    assert doc["format_version"] == VERSION == 2
    assert doc["header_size"] == HEADER_SIZE == 28
    assert codecs == {c.name for c in Codec}
    assert set(doc["vectors"]) == set(golden_payloads())


@pytest.mark.parametrize("name", sorted(golden_payloads()))
def test_encode_matches_golden_bytes(name: str) -> None:
    # Prepare
    stored = json.loads(GOLDEN.read_text())["vectors"][name]
    payload = golden_payloads()[name]

    # Execute
    data = encode(payload)

    # Assert
    assert data.hex() == stored["hex"]
    assert len(data) == stored["length"]


@pytest.mark.parametrize("name", sorted(golden_payloads()))
def test_decode_golden_bytes_gives_the_fields_back(name: str) -> None:
    # Prepare
    data = bytes.fromhex(json.loads(GOLDEN.read_text())["vectors"][name]["hex"])

    # Execute
    decoded = decode(data)

    # Assert
    assert_payload_equal(decoded, golden_payloads()[name])


@pytest.mark.parametrize("name", sorted(json.loads(GOLDEN_V1.read_text())["vectors"]))
def test_version_1_payloads_still_decode(name: str) -> None:
    # Prepare: bytes written by the previous release (format v1, no layer scales)
    data = bytes.fromhex(json.loads(GOLDEN_V1.read_text())["vectors"][name]["hex"])

    # Execute
    decoded = decode(data)

    # Assert: the same payload as v2 describes it; re-encoding only bumps the version byte
    assert data[4] == 1
    assert_payload_equal(decoded, golden_payloads()[name])
    assert encode(decoded) == data[:4] + bytes([VERSION]) + data[5:]


def test_version_1_synthetic_with_layer_scales_is_refused() -> None:
    # Prepare: v2 bytes with layer scales, relabelled as v1 (whose padding had to be zero)
    data = bytearray(valid_bytes("synthetic_layers_f32"))
    data[4] = 1

    # Execute / Assert
    expect_error(bytes(data), "padding", "layer scales")


def test_layer_scale_count_beyond_the_body_is_refused() -> None:
    # Prepare: declare 1000 layer scales in a body that holds 3
    data = bytearray(valid_bytes("synthetic_layers_f32"))
    data[HEADER_SIZE + 10 : HEADER_SIZE + 12] = (1000).to_bytes(2, "little")

    # Execute / Assert
    expect_error(bytes(data), "layer scales")


def bundle_bytes(*entries: tuple[float, bytes], count: int | None = None) -> bytes:
    body = struct.pack("<H", len(entries) if count is None else count)
    for weight, inner in entries:
        body += struct.pack("<dI", weight, len(inner)) + inner
    return header(codec=Codec.BUNDLE, direction=1, numel=3, body=body)


def test_bundle_rules() -> None:
    # Prepare
    inner = valid_bytes("weights_f32")  # numel 3
    nested = bundle_bytes((1.0, inner))

    # Execute / Assert: each rule names what is wrong
    assert decode(bundle_bytes((1.0, inner), (2.0, inner))).codec == Codec.BUNDLE
    expect_error(bundle_bytes(count=0), "at least one")
    expect_error(bundle_bytes((float("nan"), inner)), "weight", "finite")
    expect_error(bundle_bytes((1.0, nested)), "another bundle")
    expect_error(bundle_bytes((1.0, valid_bytes("dense_f32"))), "numel")  # numel 4
    expect_error(bundle_bytes((1.0, inner[:-1])), "short", "declares", "body")
    expect_error(bundle_bytes((1.0, inner), count=2), "short", "bundle")


def test_bundle_size_is_the_encoded_length() -> None:
    # Prepare
    p = golden_payloads()["bundle"]
    assert isinstance(p.body, BundleBody)

    # Execute / Assert
    assert bundle_size([len(x) for x in p.body.payloads]) == len(encode(p))


def test_version_1_bundle_is_refused() -> None:
    # Prepare
    data = bytearray(valid_bytes("bundle"))
    data[4] = 1

    # Execute / Assert
    expect_error(bytes(data), "v1", "bundle")


def test_golden_header_layout_is_little_endian_at_documented_offsets() -> None:
    # Prepare
    data = bytes.fromhex(json.loads(GOLDEN.read_text())["vectors"]["topk_f32"]["hex"])

    # Execute
    fields = (data[0:4], data[4], data[5], data[6], data[7])
    rnd, numel, body_len = (int.from_bytes(data[a:b], "little") for a, b in ((8, 12), (20, 24), (24, 28)))

    # Assert
    assert fields == (b"E3SF", 2, 0, 3, 1)
    assert data[12:20] == DIGEST
    assert (rnd, numel, body_len) == (7, 10, len(data) - 28)
    assert int.from_bytes(data[28:32], "little") == 3  # k


# --------------------------------------------------------------- header decode rules


def test_bad_magic() -> None:
    # Prepare
    data = b"XXXX" + valid_bytes()[4:]

    # Execute / Assert
    expect_error(data, "magic")


def test_unknown_version_is_unsupported_version() -> None:
    # Prepare
    data = bytearray(valid_bytes())
    data[4] = 3

    # Execute
    err = expect_error(bytes(data), "version", kind=UnsupportedVersion)

    # Assert
    assert "3" in str(err)


@pytest.mark.parametrize(
    ("offset", "value", "word"),
    [(5, 2, "direction"), (6, 0, "codec"), (6, 9, "codec"), (7, 0, "floattype"), (7, 3, "floattype")],
)
def test_unknown_enum_values(offset: int, value: int, word: str) -> None:
    # Prepare
    data = bytearray(valid_bytes())
    data[offset] = value

    # Execute / Assert
    expect_error(bytes(data), word, "header")


def test_shorter_than_header() -> None:
    # Prepare
    data = valid_bytes()[:27]

    # Execute / Assert
    expect_error(data, "header", "short")


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_body_length_mismatch(delta: int) -> None:
    # Prepare
    data = bytearray(valid_bytes())
    body_len = int.from_bytes(data[24:28], "little")
    data[24:28] = (body_len + delta).to_bytes(4, "little")

    # Execute / Assert
    expect_error(bytes(data), "body")


@pytest.mark.parametrize("name", sorted(golden_payloads()))
def test_truncation_of_every_golden_payload(name: str) -> None:
    # Prepare
    data = valid_bytes(name)

    # Execute / Assert
    for cut in range(len(data)):
        with pytest.raises(PayloadError):
            decode(data[:cut])


@pytest.mark.parametrize("name", sorted(golden_payloads()))
def test_trailing_bytes(name: str) -> None:
    # Prepare: an extra byte the header honestly counts
    data = bytearray(valid_bytes(name) + b"\x00")
    data[24:28] = (len(data) - HEADER_SIZE).to_bytes(4, "little")

    # Execute / Assert
    expect_error(bytes(data), "trailing", "short", "body", "padding", "qsgd")


def test_trailing_bytes_message_for_dense() -> None:
    # Prepare
    body = struct.pack("<3f", 1.0, 2.0, 3.0)

    # Execute / Assert
    expect_error(header(numel=2, body=body), "trailing")


def test_not_bytes() -> None:
    # Execute / Assert
    with pytest.raises(PayloadError, match="bytes"):
        decode("E3SF")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_are_accepted() -> None:
    # Prepare
    data = valid_bytes("sign")

    # Execute
    a, b = decode(bytearray(data)), decode(memoryview(data))

    # Assert
    assert_payload_equal(a, golden_payloads()["sign"])
    assert_payload_equal(b, golden_payloads()["sign"])


# ------------------------------------------------------------------ body decode rules


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("ftype", [F32, F16])
def test_non_finite_dense_values(bad: float, ftype: FloatType) -> None:
    # Prepare
    fmt = "<3f" if ftype == F32 else "<3e"
    body = struct.pack(fmt, 1.0, bad, 2.0)

    # Execute / Assert
    expect_error(header(numel=3, ftype=ftype, body=body), "nan", "inf")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_synthetic_scale_and_values(bad: float) -> None:
    # Execute / Assert
    expect_error(header(codec=Codec.SYNTHETIC, body=synthetic_body(scale=bad)), "scale", "finite")
    values = [0.5, bad, 0.5, 0.5]
    expect_error(header(codec=Codec.SYNTHETIC, body=synthetic_body(values=values)), "nan", "inf")
    values = [0.5, 0.5, 0.5, bad]  # in the labels
    expect_error(header(codec=Codec.SYNTHETIC, body=synthetic_body(values=values)), "nan", "inf")


@pytest.mark.parametrize("codec", [Codec.SIGN, Codec.STC, Codec.QSGD], ids=lambda c: c.name)
def test_non_finite_scalar_fields(codec: Codec) -> None:
    # Prepare
    nan = struct.pack("<f", float("nan"))
    body = {
        Codec.SIGN: nan + b"\x00",
        Codec.STC: struct.pack("<I", 0) + nan,
        Codec.QSGD: nan + b"\x01" + b"\x00" * 8,
    }[codec]

    # Execute / Assert
    expect_error(header(codec=codec, numel=8, body=body), "finite", "nan")


def test_topk_non_finite_values() -> None:
    # Prepare
    body = struct.pack("<I2I2f", 2, 0, 1, 1.0, float("inf"))

    # Execute / Assert
    expect_error(header(codec=Codec.TOPK, numel=4, body=body), "nan", "inf")


@pytest.mark.parametrize(
    ("indices", "numel"),
    [([3, 1], 5), ([1, 1], 5), ([0, 5], 5), ([4294967295], 5), ([0, 2, 2], 9)],
    ids=["unsorted", "duplicate", "equal-numel", "u32-max", "repeated-tail"],
)
@pytest.mark.parametrize("codec", [Codec.TOPK, Codec.STC], ids=lambda c: c.name)
def test_bad_sparse_indices(indices: list[int], numel: int, codec: Codec) -> None:
    # Prepare
    k = len(indices)
    idx = struct.pack(f"<{k}I", *indices)
    if codec == Codec.TOPK:
        body = struct.pack("<I", k) + idx + struct.pack(f"<{k}f", *([1.0] * k))
    else:
        body = struct.pack("<If", k, 1.0) + idx + b"\x00" * ((k + 7) // 8)

    # Execute / Assert
    expect_error(header(codec=codec, numel=numel, body=body), "indices")


def test_topk_k_larger_than_numel() -> None:
    # Prepare
    body = struct.pack("<I3I3f", 3, 0, 1, 2, 1.0, 1.0, 1.0)

    # Execute / Assert
    expect_error(header(codec=Codec.TOPK, numel=2, body=body), "k=3")


@pytest.mark.parametrize(("count", "last"), [(10, 0b0000_0100), (9, 0b0000_0010), (1, 0b1000_0000)])
def test_sign_padding_bits_must_be_zero(count: int, last: int) -> None:
    # Prepare: last byte carries bits beyond ``count``
    nbytes = (count + 7) // 8
    bits = b"\x00" * (nbytes - 1) + bytes([last])
    body = struct.pack("<f", 1.0) + bits

    # Execute / Assert
    expect_error(header(codec=Codec.SIGN, numel=count, body=body), "padding")


def test_stc_sign_padding_bits_must_be_zero() -> None:
    # Prepare: k=3 signs, bit 3 set
    body = struct.pack("<If3I", 3, 1.0, 0, 1, 2) + bytes([0b0000_1000])

    # Execute / Assert
    expect_error(header(codec=Codec.STC, numel=3, body=body), "padding")


def test_sign_bits_little_endian_within_byte() -> None:
    # Prepare: only bit 0 (first weight) and bit 9 (tenth weight) negative
    body = struct.pack("<f", 2.0) + bytes([0b0000_0001, 0b0000_0010])

    # Execute
    p = decode(header(codec=Codec.SIGN, numel=10, body=body))

    # Assert
    assert torch.nonzero(p.body.negative).flatten().tolist() == [0, 9]  # type: ignore[union-attr]


@pytest.mark.parametrize(("levels", "q"), [(4, 5), (4, -5), (127, -128), (1, 2)])
def test_qsgd_value_beyond_levels(levels: int, q: int) -> None:
    # Prepare
    body = struct.pack("<fB3b", 1.0, levels, 0, q, 0)

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=3, body=body), "levels")


@pytest.mark.parametrize("levels", [0, 128, 255])
def test_qsgd_levels_out_of_range(levels: int) -> None:
    # Prepare
    body = struct.pack("<fB3b", 1.0, levels, 0, 0, 0)

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=3, body=body), "levels")


def test_synthetic_n_zero_and_classes_zero() -> None:
    # Prepare
    n_zero = struct.pack("<fHHB3xI", 1.0, 0, 2, 1, 2)
    classes_zero = struct.pack("<fHHB3xI", 1.0, 1, 0, 1, 2) + struct.pack("<2f", 1.0, 1.0)

    # Execute / Assert
    expect_error(header(codec=Codec.SYNTHETIC, body=n_zero), "n >= 1")
    expect_error(header(codec=Codec.SYNTHETIC, body=classes_zero), "n_classes")


@pytest.mark.parametrize("ndim", [0, 5, 255])
def test_synthetic_ndim_out_of_range(ndim: int) -> None:
    # Prepare
    body = struct.pack("<fHHB3x", 1.0, 1, 2, ndim) + b"\x01\x00\x00\x00" * 8

    # Execute / Assert
    expect_error(header(codec=Codec.SYNTHETIC, body=body), "ndim")


@pytest.mark.parametrize("dims", [(0,), (3, 0), (2**24 + 1,), (2**16, 2**16), (2**32 - 1,) * 4])
def test_synthetic_dims_out_of_range(dims: tuple[int, ...]) -> None:
    # Prepare
    body = struct.pack("<fHHB3x", 1.0, 1, 2, len(dims)) + struct.pack(f"<{len(dims)}I", *dims)

    # Execute / Assert
    expect_error(header(codec=Codec.SYNTHETIC, body=body), "dims")


def test_synthetic_values_shorter_than_declared() -> None:
    # Prepare: n=3, 2-dim inputs and 2 classes need 12 floats; give 11
    body = synthetic_body(n=3, values=[0.5] * 11)

    # Execute / Assert
    expect_error(header(codec=Codec.SYNTHETIC, body=body), "bytes", "short")


def test_synthetic_decodes_shapes() -> None:
    # Prepare
    body = synthetic_body(n=2, n_classes=3, dims=(1, 2, 2), values=[float(i) for i in range(2 * (4 + 3))])

    # Execute
    p = decode(header(codec=Codec.SYNTHETIC, numel=17, body=body))

    # Assert
    assert isinstance(p.body, SyntheticBody)
    assert tuple(p.body.inputs.shape) == (2, 1, 2, 2)
    assert tuple(p.body.labels.shape) == (2, 3)
    torch.testing.assert_close(p.body.labels[1], torch.tensor([11.0, 12.0, 13.0]))


# --------------------------------------------------- declared sizes bigger than the data


HUGE_CASES = {
    "dense": (Codec.DENSE, MAX_NUMEL, b"\x00" * 4),
    "weights": (Codec.WEIGHTS, MAX_NUMEL, b"\x00" * 8),
    "sign": (Codec.SIGN, MAX_NUMEL, struct.pack("<f", 1.0) + b"\x00"),
    "qsgd": (Codec.QSGD, MAX_NUMEL, struct.pack("<fB", 1.0, 4) + b"\x00"),
    "topk": (Codec.TOPK, MAX_NUMEL, struct.pack("<I", 2**32 - 1) + b"\x00" * 8),
    "stc": (Codec.STC, MAX_NUMEL, struct.pack("<If", 2**32 - 1, 1.0) + b"\x00" * 5),
    "synthetic": (
        Codec.SYNTHETIC,
        MAX_NUMEL,
        struct.pack("<fHHB3x4I", 1.0, 65535, 65535, 4, 16, 16, 16, 16) + b"\x00" * 8,
    ),
}


@pytest.mark.parametrize("case", sorted(HUGE_CASES))
def test_huge_declared_sizes_fail_fast_without_allocating(case: str) -> None:
    # Prepare
    codec, numel, body = HUGE_CASES[case]
    data = header(codec=codec, numel=numel, body=body)
    tracemalloc.start()

    # Execute
    try:
        start = time.perf_counter()
        with pytest.raises(PayloadError) as info:
            decode(data)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert
    assert seconds < 0.5
    assert peak < 1_000_000
    assert any(w in str(info.value) for w in ("bytes", "short", "needs"))


def test_numel_above_limit() -> None:
    # Prepare
    data = header(numel=MAX_NUMEL + 1, body=b"")

    # Execute / Assert
    expect_error(data, "numel")


# ------------------------------------------------------------------------ encoding


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("ftype", [F32, F16])
def test_encode_rejects_non_finite_values(bad: float, ftype: FloatType) -> None:
    # Prepare
    dense = make(Codec.DENSE, DenseBody(torch.tensor([1.0, bad])), 2, float_type=ftype)
    synth = make(
        Codec.SYNTHETIC,
        SyntheticBody(scale=1.0, inputs=torch.tensor([[bad, 1.0]]), labels=torch.ones(1, 2)),
        5,
        float_type=ftype,
    )
    topk = make(Codec.TOPK, SparseBody(torch.tensor([1]), torch.tensor([bad])), 2, float_type=ftype)

    # Execute / Assert
    for p in (dense, synth, topk):
        with pytest.raises(PayloadError, match="non-finite"):
            encode(p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_rejects_non_finite_scalars(bad: float) -> None:
    # Prepare
    payloads = [
        make(Codec.SYNTHETIC, SyntheticBody(bad, torch.ones(1, 2), torch.ones(1, 2)), 5),
        make(Codec.SIGN, SignBody(torch.zeros(3, dtype=torch.bool), bad), 3),
        make(Codec.STC, TernaryBody(torch.tensor([0]), torch.tensor([True]), bad), 3),
        make(Codec.QSGD, QuantBody(bad, 2, torch.zeros(3, dtype=torch.int8)), 3),
    ]

    # Execute / Assert
    for p in payloads:
        with pytest.raises(PayloadError, match="finite"):
            encode(p)


def test_encode_rejects_float16_overflow() -> None:
    # Prepare
    p = make(Codec.DENSE, DenseBody(torch.tensor([1e5])), 1, float_type=F16)

    # Execute / Assert (NumPy may also warn about the overflowing cast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(PayloadError, match="FLOAT16"):
            encode(p)


@pytest.mark.parametrize("codec", [Codec.SYNTHETIC, Codec.SIGN, Codec.STC, Codec.QSGD], ids=lambda c: c.name)
def test_encode_rejects_scalars_beyond_float32(codec: Codec) -> None:
    # Prepare
    big = 1e39
    p = {
        Codec.SYNTHETIC: make(codec, SyntheticBody(big, torch.ones(1, 2), torch.ones(1, 2)), 5),
        Codec.SIGN: make(codec, SignBody(torch.zeros(3, dtype=torch.bool), big), 3),
        Codec.STC: make(codec, TernaryBody(torch.tensor([0]), torch.tensor([True]), big), 3),
        Codec.QSGD: make(codec, QuantBody(big, 2, torch.zeros(3, dtype=torch.int8)), 3),
    }[codec]

    # Execute / Assert
    with pytest.raises(PayloadError, match="finite"):
        encode(p)


def test_encode_rejects_inconsistent_bodies() -> None:
    # Prepare
    payloads = [
        make(Codec.DENSE, DenseBody(torch.ones(3)), 4),
        make(Codec.TOPK, SparseBody(torch.tensor([2, 1]), torch.ones(2)), 4),
        make(Codec.TOPK, SparseBody(torch.tensor([0, 4]), torch.ones(2)), 4),
        make(Codec.TOPK, SparseBody(torch.tensor([0, 1]), torch.ones(3)), 4),
        make(Codec.STC, TernaryBody(torch.tensor([0, 1]), torch.tensor([True]), 1.0), 4),
        make(Codec.SIGN, SignBody(torch.zeros(3, dtype=torch.bool), 1.0), 4),
        make(Codec.QSGD, QuantBody(1.0, 2, torch.tensor([0, 3, 0, 0], dtype=torch.int8)), 4),
        make(Codec.QSGD, QuantBody(1.0, 0, torch.zeros(4, dtype=torch.int8)), 4),
        make(Codec.SYNTHETIC, SyntheticBody(1.0, torch.ones(2, 3), torch.ones(1, 2)), 4),
        make(Codec.SYNTHETIC, SyntheticBody(1.0, torch.ones(2), torch.ones(2, 2)), 4),
        make(Codec.DENSE, DenseBody(torch.ones(1)), 1, digest=b"short"),
        make(Codec.DENSE, DenseBody(torch.ones(1)), 1, server_round=2**32),
    ]

    # Execute / Assert
    for p in payloads:
        with pytest.raises(PayloadError):
            encode(p)


@pytest.mark.parametrize("case", ["codec-body-mismatch", "n-classes-0", "n-classes-65536", "input-too-large"])
def test_encode_never_emits_undecodable_bytes(case: str) -> None:
    # Prepare
    p = {
        "codec-body-mismatch": make(Codec.TOPK, DenseBody(torch.ones(4)), 4),
        "n-classes-0": make(Codec.SYNTHETIC, SyntheticBody(1.0, torch.ones(1, 2), torch.ones(1, 0)), 4),
        "n-classes-65536": make(
            Codec.SYNTHETIC, SyntheticBody(1.0, torch.ones(1, 2), torch.zeros(1, 65536)), 4
        ),
        "input-too-large": make(
            Codec.SYNTHETIC, SyntheticBody(1.0, torch.zeros(1, 2**24 + 1), torch.ones(1, 1)), 4
        ),
    }[case]

    # Execute
    try:
        data = encode(p)
    except PayloadError:
        return  # the desired behaviour

    # Assert: if it encodes, it must decode to the same payload
    assert_payload_equal(decode(data), p)


def test_synthetic_padding_bytes_must_be_zero() -> None:
    # Prepare
    data = bytearray(valid_bytes("synthetic_f32"))
    data[HEADER_SIZE + 4 + 2 + 2 + 1] = 0xFF

    # Execute / Assert
    with pytest.raises(PayloadError):
        decode(bytes(data))


def test_encode_length_is_header_plus_body() -> None:
    # Prepare
    payloads = golden_payloads()

    # Execute / Assert
    for p in payloads.values():
        data = encode(p)
        assert len(data) == HEADER_SIZE + int.from_bytes(data[24:28], "little")


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        write_golden()
        print(f"wrote {GOLDEN}")
    else:
        print(__doc__)
