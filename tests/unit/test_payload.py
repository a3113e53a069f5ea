"""Wire codec (e3sfc_core.payload): golden vectors and every decode rule.

The golden file ``tests/data/payload_v5_golden.json`` is the frozen byte layout of
the current format; ``payload_v1_golden.json`` to ``payload_v4_golden.json`` are the
previous formats', which must still decode. The tests compare against the stored files and never
rewrite them; regenerate the current one only on purpose (a format change must bump
``VERSION``, which writes a new ``payload_v<VERSION>_golden.json`` and keeps the old ones)::

    .venv/bin/python -m tests.unit.test_payload --regenerate
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

import numpy as np
import pytest
import torch

from e3sfc_core import compact
from e3sfc_core.bitcodec import BitWriter
from e3sfc_core.errors import PayloadError, UnsupportedVersion
from e3sfc_core.lowrank import LowRankBody
from e3sfc_core.payload import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_NUMEL,
    READABLE_VERSIONS,
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
    bundle_size,
    decode,
    encode,
)

from .body_equality import assert_same_body

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = DATA / f"payload_v{VERSION}_golden.json"
GOLDEN_V1 = DATA / "payload_v1_golden.json"
GOLDEN_V2 = DATA / "payload_v2_golden.json"
GOLDEN_V3 = DATA / "payload_v3_golden.json"
GOLDEN_V4 = DATA / "payload_v4_golden.json"
LEGACY = {1: GOLDEN_V1, 2: GOLDEN_V2, 3: GOLDEN_V3, 4: GOLDEN_V4}
# codecs whose body layout changed in v3 (v1/v2 bodies decode with the old layout)
RECODED = {Codec.TOPK, Codec.STC, Codec.QSGD}
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
    assert_same_body(actual.body, expected.body)


SPREAD = [3, 17, 30, 46, 60, 71, 88, 97, 110, 125, 131, 150, 166, 170, 188, 199, 215, 228, 240, 251]


def _spread(big: dict[int, int]) -> torch.Tensor:
    """256 levels: +-1 at 20 unevenly spaced positions (every third negative), the
    entries ``big`` (index into the 20 -> level) set apart."""
    q = torch.zeros(256, dtype=torch.int8)
    q[torch.tensor(SPREAD)] = torch.tensor([-1 if j % 3 == 0 else 1 for j in range(20)], dtype=torch.int8)
    for j, level in big.items():
        q[SPREAD[j]] = level
    return q


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
        "topk_bitmap_f16": make(
            Codec.TOPK,
            SparseBody(indices=torch.tensor([0, 1, 2, 4, 5, 7, 8, 9]), values=torch.arange(1.0, 9.0)),
            10,
            float_type=F16,
        ),
        "qsgd": make(
            Codec.QSGD,
            QuantBody(
                norms=torch.tensor([3.5, 0.75]),
                levels=4,
                q=torch.tensor([0, 4, -4, 1, -1, 2], dtype=torch.int8),
                bucket_size=4,
            ),
            6,
        ),
        "qsgd_gamma": make(
            Codec.QSGD,
            QuantBody(
                norms=torch.tensor([2.0, 0.0, 1.5]),
                levels=16,
                q=torch.tensor([0] * 5 + [1] + [0] * 20 + [-3, 16] + [0] * 12, dtype=torch.int8),
                bucket_size=16,
            ),
            40,
        ),
        # Rice-coded levels (v5): 20 nonzeros of 256, s = 1 in one bucket (no magnitudes
        # above 1), then s = 4 in buckets of 128 with two magnitudes above 1 (a tie with
        # gamma, which the Rice mode wins)
        "qsgd_rice_s1": make(
            Codec.QSGD,
            QuantBody(norms=torch.tensor([0.5]), levels=1, q=_spread({}), bucket_size=256),
            256,
        ),
        "qsgd_rice": make(
            Codec.QSGD,
            QuantBody(norms=torch.tensor([4.0, 0.25]), levels=4, q=_spread({2: 4, 11: -2}), bucket_size=128),
            256,
        ),
        "lowrank_f32": make(
            Codec.LOWRANK,
            LowRankBody(
                layout=((3, 3, 1), (2, 1, 0)),
                values=torch.tensor([0.5, -0.25, 1.0, 2.0, 0.0, -4.0, 0.125, -1.5]),
            ),
            11,
        ),
        "lowrank_f16": make(
            Codec.LOWRANK,
            LowRankBody(layout=((3, 1, 0), (4, 5, 2)), values=torch.arange(-10.0, 11.0) * 0.25),
            23,
            float_type=F16,
            direction=Direction.DOWNLINK,
        ),
        "corrected_f16": make(
            Codec.CORRECTED,
            CorrectedBody(
                synthetic=SyntheticBody(
                    scale=1.0,
                    inputs=torch.tensor([[0.5, -1.0]]),
                    labels=torch.tensor([[2.0, -0.25]]),
                    layer_scales=torch.tensor([1.5, 0.0]),
                ),
                correction=SparseBody(
                    indices=torch.tensor([3, 40, 41]), values=torch.tensor([0.5, -8.0, 1.25])
                ),
            ),
            50,
            float_type=F16,
        ),
        "corrected_alone_f32": make(
            Codec.CORRECTED,
            CorrectedBody(
                synthetic=None, correction=SparseBody(indices=torch.tensor([2]), values=torch.tensor([-3.0]))
            ),
            6,
            direction=Direction.DOWNLINK,
        ),
        "corrected_ternary_f16": make(
            Codec.CORRECTED_TAGGED,
            CorrectedBody(
                synthetic=SyntheticBody(
                    scale=-0.5,
                    inputs=torch.tensor([[1.0, 0.25]]),
                    labels=torch.tensor([[-1.0, 3.0]]),
                ),
                correction=TernaryBody(
                    indices=torch.tensor([0, 7, 39]),
                    negative=torch.tensor([False, True, True]),
                    magnitude=0.375,
                ),
            ),
            40,
            float_type=F16,
        ),
        "corrected_ternary_alone_f32": make(
            Codec.CORRECTED_TAGGED,
            CorrectedBody(
                synthetic=None,
                correction=TernaryBody(
                    indices=torch.tensor([1, 4]), negative=torch.tensor([True, False]), magnitude=2.0
                ),
            ),
            5,
        ),
        "corrected_tagged_topk_f32": make(
            Codec.CORRECTED_TAGGED,
            CorrectedBody(
                synthetic=SyntheticBody(
                    scale=2.0, inputs=torch.tensor([[0.5]]), labels=torch.tensor([[1.0, -1.0]])
                ),
                correction=SparseBody(indices=torch.tensor([0, 5]), values=torch.tensor([-0.25, 4.0])),
            ),
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


def legacy_payloads(version: int) -> dict[str, Payload]:
    """What an older version's golden vectors decode to: the current golden payloads,
    except QSGD in v1/v2, which had one norm for the whole vector then."""
    out = golden_payloads()
    if version >= 3:
        return out
    out["qsgd"] = make(
        Codec.QSGD,
        QuantBody(
            norms=torch.tensor([3.5]),
            levels=4,
            q=torch.tensor([0, 4, -4, 1, -1, 2], dtype=torch.int8),
            bucket_size=6,
        ),
        6,
    )
    return out


def write_golden(path: Path = GOLDEN) -> None:
    """Deliberate regeneration of the current version's file only (see module docstring)."""
    if path.name != f"payload_v{VERSION}_golden.json":
        raise SystemExit(f"refusing to overwrite {path.name}: only v{VERSION} vectors are written")
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
    assert doc["format_version"] == VERSION == 5
    assert READABLE_VERSIONS == (1, 2, 3, 4, 5)
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


LEGACY_VECTORS = [
    (version, name)
    for version, path in LEGACY.items()
    for name in sorted(json.loads(path.read_text())["vectors"])
]


@pytest.mark.parametrize(("version", "name"), LEGACY_VECTORS)
def test_older_versions_still_decode(version: int, name: str) -> None:
    # Prepare: bytes written by earlier releases (v1: no layer scales; v1/v2: 32-bit
    # indices and one QSGD byte per weight)
    data = bytes.fromhex(json.loads(LEGACY[version].read_text())["vectors"][name]["hex"])

    # Execute
    decoded = decode(data)

    # Assert: the same payload as v3 describes it; where the body layout did not change,
    # re-encoding only bumps the version byte, else it writes the v3 layout
    assert data[4] == version
    expected = legacy_payloads(version)[name]
    if isinstance(decoded.body, BundleBody) and isinstance(expected.body, BundleBody):
        # the inner payloads are bytes of that version too: compare what they decode to
        assert decoded.body.weights == expected.body.weights
        for got, want in zip(decoded.body.payloads, expected.body.payloads, strict=True):
            assert got[4] == version
            assert_payload_equal(decode(got), decode(want))
    else:
        assert_payload_equal(decoded, expected)
    again = encode(decoded)
    if (decoded.codec in RECODED and version < 3) or (decoded.codec == Codec.QSGD and version < 5):
        # v5 may pick the Rice levels mode where v3/v4 could only pick gamma or packed
        assert again[4] == VERSION
        assert_payload_equal(decode(again), decoded)
    else:
        assert again == data[:4] + bytes([VERSION]) + data[5:]


def test_v3_is_smaller_than_v2_for_the_recoded_codecs() -> None:
    # Prepare
    old = json.loads(GOLDEN_V2.read_text())["vectors"]
    new = json.loads(GOLDEN_V3.read_text())["vectors"]

    # Execute / Assert (the v3 QSGD golden has two buckets, so two norms: not compared)
    for name in ("topk_f32", "stc"):
        assert new[name]["length"] < old[name]["length"], name


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


@pytest.mark.parametrize("version", [1, 2])
def test_lowrank_before_version_3_is_refused(version: int) -> None:
    # Prepare: codec 9 did not exist in v1/v2
    data = bytearray(valid_bytes("lowrank_f32"))
    data[4] = version

    # Execute / Assert
    expect_error(bytes(data), f"v{version}", "low-rank")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_corrected_before_version_4_is_refused(version: int) -> None:
    # Prepare: codec 10 did not exist before v4
    data = bytearray(valid_bytes("corrected_f16"))
    data[4] = version

    # Execute / Assert
    expect_error(bytes(data), f"v{version}", "corrected")


def corrected_bytes(synthetic: bytes, declared: int | None = None, sparse: bytes | None = None) -> bytes:
    """A corrected body by hand: the synthetic part's length, the part, a top-k part."""
    length = len(synthetic) if declared is None else declared
    sparse = struct.pack("<IBB", 1, 1, 0) + struct.pack("<f", 2.0) + b"\x01" if sparse is None else sparse
    return header(codec=Codec.CORRECTED, numel=4, body=struct.pack("<I", length) + synthetic + sparse)


def test_corrected_rules() -> None:
    # Prepare: a one-sample synthetic part, and a top-k part keeping index 0 (a bitmap: 4 weights)
    part = synthetic_body()

    # Execute / Assert: the well-formed body decodes; each broken rule is named
    body = decode(corrected_bytes(part)).body
    assert isinstance(body, CorrectedBody)
    assert body.correction.indices.tolist() == [0] and body.synthetic.inputs.shape == (1, 2)
    expect_error(corrected_bytes(part + b"\x00\x00"), "trailing bytes after the synthetic part")
    expect_error(corrected_bytes(part, declared=len(part) + 100), "synthetic part")
    expect_error(corrected_bytes(part[:-4], declared=len(part) - 4), "synthetic values")
    expect_error(corrected_bytes(part, sparse=struct.pack("<IBB", 5, 0, 0)), "k=5 > numel=4")
    alone = decode(corrected_bytes(b"")).body  # length 0: no batch, the sparse part alone
    assert isinstance(alone, CorrectedBody) and alone.synthetic is None


def lowrank_bytes(records: list[tuple[int, int, int]], numel: int, floats: int, value: float = 0.5) -> bytes:
    body = struct.pack("<I", len(records)) + b"".join(struct.pack("<IIH", *r) for r in records)
    return header(codec=Codec.LOWRANK, numel=numel, body=body + struct.pack(f"<{floats}f", *[value] * floats))


def test_lowrank_rules() -> None:
    # Execute / Assert: the spec's example decodes; each broken rule is named
    assert decode(lowrank_bytes([(3, 3, 1), (2, 1, 0)], 11, 8)).codec == Codec.LOWRANK
    assert decode(lowrank_bytes([], 0, 0)).numel == 0
    expect_error(lowrank_bytes([(2, 2, 1)], 4, 4), "not smaller than dense")
    expect_error(lowrank_bytes([(3, 3, 3)], 9, 18), "not smaller than dense")
    expect_error(lowrank_bytes([(40, 40, 1025)], 1600, 0), "exceeds")
    expect_error(lowrank_bytes([(0, 3, 0)], 0, 0), "empty")
    expect_error(lowrank_bytes([(3, 3, 1)], 10, 6), "cover")
    expect_error(lowrank_bytes([(3, 3, 1)], 8, 6), "cover")
    expect_error(lowrank_bytes([(3, 3, 1)], 9, 7), "bytes of values")
    expect_error(lowrank_bytes([(3, 3, 1)], 9, 5), "bytes of values")
    expect_error(lowrank_bytes([(3, 3, 1)], 9, 6, float("inf")), "nan or inf")
    expect_error(header(codec=Codec.LOWRANK, numel=9, body=struct.pack("<I", 2**32 - 1)), "records")
    expect_error(header(codec=Codec.LOWRANK, numel=9, body=b"\x01"), "short")


def test_lowrank_encode_refuses_inconsistent_bodies() -> None:
    # Prepare
    bad = [
        (LowRankBody(((3, 3, 1),), torch.zeros(5)), 9),  # too few values
        (LowRankBody(((3, 3, 1),), torch.zeros(6)), 10),  # does not cover numel
        (LowRankBody(((2, 2, 1),), torch.zeros(4)), 4),  # not smaller than dense
        (LowRankBody(((3, 1, 0),), torch.tensor([1.0, float("nan"), 0.0])), 3),
    ]

    # Execute / Assert
    for body, numel in bad:
        with pytest.raises(PayloadError):
            encode(make(Codec.LOWRANK, body, numel))


def test_golden_header_layout_is_little_endian_at_documented_offsets() -> None:
    # Prepare
    data = bytes.fromhex(json.loads(GOLDEN.read_text())["vectors"]["topk_f32"]["hex"])

    # Execute
    fields = (data[0:4], data[4], data[5], data[6], data[7])
    rnd, numel, body_len = (int.from_bytes(data[a:b], "little") for a, b in ((8, 12), (20, 24), (24, 28)))

    # Assert
    assert fields == (b"E3SF", VERSION, 0, 3, 1)
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
    data[4] = VERSION + 1

    # Execute
    err = expect_error(bytes(data), "version", kind=UnsupportedVersion)

    # Assert
    assert str(VERSION + 1) in str(err)


@pytest.mark.parametrize(
    ("offset", "value", "word"),
    [(5, 2, "direction"), (6, 0, "codec"), (6, 12, "codec"), (7, 0, "floattype"), (7, 3, "floattype")],
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
        Codec.QSGD: struct.pack("<BBI", 1, 1, 8) + nan + b"\x00" * 2,
    }[codec]

    # Execute / Assert
    expect_error(header(codec=codec, numel=8, body=body), "finite", "nan")


def test_topk_non_finite_values() -> None:
    # Prepare
    body = struct.pack("<IBB2f", 2, 0, 0, 1.0, float("inf")) + b"\x03"

    # Execute / Assert
    expect_error(header(codec=Codec.TOPK, numel=4, body=body), "nan", "inf")
    legacy = struct.pack("<I2I2f", 2, 0, 1, 1.0, float("inf"))
    expect_error(header(codec=Codec.TOPK, numel=4, body=legacy, version=2), "nan", "inf")


@pytest.mark.parametrize(
    ("indices", "numel"),
    [([3, 1], 5), ([1, 1], 5), ([0, 5], 5), ([4294967295], 5), ([0, 2, 2], 9)],
    ids=["unsorted", "duplicate", "equal-numel", "u32-max", "repeated-tail"],
)
@pytest.mark.parametrize("codec", [Codec.TOPK, Codec.STC], ids=lambda c: c.name)
def test_bad_sparse_indices_in_the_v2_layout(indices: list[int], numel: int, codec: Codec) -> None:
    # Prepare
    k = len(indices)
    idx = struct.pack(f"<{k}I", *indices)
    if codec == Codec.TOPK:
        body = struct.pack("<I", k) + idx + struct.pack(f"<{k}f", *([1.0] * k))
    else:
        body = struct.pack("<If", k, 1.0) + idx + b"\x00" * ((k + 7) // 8)

    # Execute / Assert
    expect_error(header(codec=codec, numel=numel, body=body, version=2), "indices")


def test_topk_k_larger_than_numel() -> None:
    # Prepare
    body = struct.pack("<IBB3f", 3, 1, 0, 1.0, 1.0, 1.0) + b"\x03"
    legacy = struct.pack("<I3I3f", 3, 0, 1, 2, 1.0, 1.0, 1.0)

    # Execute / Assert
    expect_error(header(codec=Codec.TOPK, numel=2, body=body), "k=3")
    expect_error(header(codec=Codec.TOPK, numel=2, body=legacy, version=2), "k=3")


@pytest.mark.parametrize(("count", "last"), [(10, 0b0000_0100), (9, 0b0000_0010), (1, 0b1000_0000)])
def test_sign_padding_bits_must_be_zero(count: int, last: int) -> None:
    # Prepare: last byte carries bits beyond ``count``
    nbytes = (count + 7) // 8
    bits = b"\x00" * (nbytes - 1) + bytes([last])
    body = struct.pack("<f", 1.0) + bits

    # Execute / Assert
    expect_error(header(codec=Codec.SIGN, numel=count, body=body), "padding")


def test_stc_sign_padding_bits_must_be_zero() -> None:
    # Prepare: k=3 signs, bit 3 set (then a bitmap of positions 0, 1, 2)
    body = struct.pack("<IfBB", 3, 1.0, 1, 0) + bytes([0b0000_1000, 0b0000_0111])
    legacy = struct.pack("<If3I", 3, 1.0, 0, 1, 2) + bytes([0b0000_1000])

    # Execute / Assert
    expect_error(header(codec=Codec.STC, numel=3, body=body), "padding")
    expect_error(header(codec=Codec.STC, numel=3, body=legacy, version=2), "padding")


def test_sign_bits_little_endian_within_byte() -> None:
    # Prepare: only bit 0 (first weight) and bit 9 (tenth weight) negative
    body = struct.pack("<f", 2.0) + bytes([0b0000_0001, 0b0000_0010])

    # Execute
    p = decode(header(codec=Codec.SIGN, numel=10, body=body))

    # Assert
    assert torch.nonzero(p.body.negative).flatten().tolist() == [0, 9]  # type: ignore[union-attr]


def qsgd_body(levels: int, mode: int, bucket: int, norms: list[float], section: bytes) -> bytes:
    return struct.pack(f"<BBI{len(norms)}f", levels, mode, bucket, *norms) + section


def packed(values: list[int], width: int) -> bytes:
    w = BitWriter()
    w.fields(np.array(values), width)
    return w.getvalue()


def gamma_section(runs: list[int], mags: list[int], negative: list[bool]) -> bytes:
    w = BitWriter()
    w.gamma(np.array(runs))
    w.gamma(np.array(mags))
    w.flags(np.array(negative, dtype=bool))
    return struct.pack("<I", len(runs)) + w.getvalue()


@pytest.mark.parametrize(("levels", "stored"), [(4, 9), (4, 15), (1, 3), (127, 255)])
def test_qsgd_packed_value_beyond_levels(levels: int, stored: int) -> None:
    # Prepare: three packed levels (``q + s``), one of them above 2s
    width = (2 * levels).bit_length()
    body = qsgd_body(levels, 1, 512, [1.0], packed([levels, stored, levels], width))

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=3, body=body), "levels")


@pytest.mark.parametrize(("levels", "mag"), [(4, 5), (1, 2), (127, 128)])
def test_qsgd_gamma_value_beyond_levels(levels: int, mag: int) -> None:
    # Prepare: 200 weights, one nonzero of magnitude ``mag``
    body = qsgd_body(levels, 0, 512, [1.0], gamma_section([10], [mag], [True]))

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=200, body=body), "levels")


@pytest.mark.parametrize(("levels", "q"), [(4, 5), (4, -5), (127, -128), (1, 2)])
def test_qsgd_v2_value_beyond_levels(levels: int, q: int) -> None:
    # Prepare
    body = struct.pack("<fB3b", 1.0, levels, 0, q, 0)

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=3, body=body, version=2), "levels")


@pytest.mark.parametrize("levels", [0, 128, 255])
def test_qsgd_levels_out_of_range(levels: int) -> None:
    # Prepare
    body = qsgd_body(levels, 1, 512, [1.0], b"\x00" * 3)
    legacy = struct.pack("<fB3b", 1.0, levels, 0, 0, 0)

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=3, body=body), "levels")
    expect_error(header(codec=Codec.QSGD, numel=3, body=legacy, version=2), "levels")


@pytest.mark.parametrize("bucket", [0, 65537, 2**32 - 1])
def test_qsgd_bucket_out_of_range(bucket: int) -> None:
    # Prepare
    body = qsgd_body(4, 1, bucket, [1.0], packed([4, 4, 4], 4))

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=3, body=body), "bucket")


def test_qsgd_norm_count_follows_the_bucket_size() -> None:
    # Prepare: 10 weights in buckets of 4 need 3 norms; give 2 (the levels then misalign)
    body = qsgd_body(4, 1, 4, [1.0, 1.0], packed([4] * 10, 4))
    good = qsgd_body(4, 1, 4, [1.0, 1.0, 2.0], packed([4] * 9 + [5], 4))

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=10, body=body), "qsgd", "levels")
    p = decode(header(codec=Codec.QSGD, numel=10, body=good))
    assert isinstance(p.body, QuantBody)
    assert p.body.q.tolist() == [0] * 9 + [1] and p.body.norms.tolist() == [1.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("section", "words"),
    [
        (gamma_section([120], [1], [False]), ("numel", "exceeds")),  # run reaches past the 100 weights
        (gamma_section([1, 1], [1], [False]), ("short", "unary", "fit")),  # m=2, one level
        (gamma_section([1], [1], [False]) + b"\x00", ("trailing",)),
        (gamma_section([1], [1], [False])[:-1] + b"\x81", ("padding", "unary", "exceeds")),
        (struct.pack("<I", 2**31), ("nonzero", "fit")),
        (b"\x01\x00", ("short",)),
    ],
    ids=["past-numel", "missing-level", "trailing", "padding", "huge-m", "no-count"],
)
def test_qsgd_gamma_stream_rules(section: bytes, words: tuple[str, ...]) -> None:
    # Prepare
    body = qsgd_body(16, 0, 512, [1.0], section)

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=100, body=body), *words)


def test_qsgd_mode_must_be_the_encoders_choice() -> None:
    # Prepare: a 200-weight vector with one nonzero is smaller gamma-coded; sent packed
    values = [16] * 200
    values[7] = 17
    as_packed = qsgd_body(16, 1, 512, [1.0], packed(values, 6))
    as_gamma = qsgd_body(16, 0, 512, [1.0], gamma_section([8], [1], [False]))

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=200, body=as_packed), "non-canonical")
    assert decode(header(codec=Codec.QSGD, numel=200, body=as_gamma)).body.q[7] == 1  # type: ignore[union-attr]
    expect_error(header(codec=Codec.QSGD, numel=200, body=qsgd_body(16, 3, 512, [1.0], b"")), "mode")
    rice_in_v4 = header(codec=Codec.QSGD, numel=200, body=qsgd_body(16, 2, 512, [1.0], b""), version=4)
    expect_error(rice_in_v4, "mode", "v5")


def rice_levels(
    runs: list[int],
    b_run: int,
    big: list[int],
    b_gap: int,
    above_two: list[int],
    b_big: int,
    negative: list[bool],
) -> bytes:
    """A Rice levels section: ``big`` are the gaps before each magnitude above 1 (among the
    nonzeros), ``above_two`` those magnitudes minus 2."""
    w = BitWriter()
    w.rice(np.array(runs), b_run)
    w.rice(np.array(big), b_gap)
    w.rice(np.array(above_two), b_big)
    w.flags(np.array(negative, dtype=bool))
    return struct.pack("<IIBBB", len(runs), len(big), b_run, b_gap, b_big) + w.getvalue()


# 800 weights, s = 1, 16 nonzeros after runs of 30 to 50 zeros: Rice is the encoder's
# choice with b_run = 5; with s = 4 the 3rd and 10th nonzero are 3 and -2 (b_gap = 2)
RICE_RUNS = [40, 37, 50, 33, 45, 39, 41, 36, 48, 30, 44, 38, 42, 35, 47, 40]
PLUS = [False] * 16


def rice_s1(**change: int) -> bytes:
    params = {"b_run": 5, "b_gap": 0, "b_big": 0, **change}
    return rice_levels(RICE_RUNS, params["b_run"], [], params["b_gap"], [], params["b_big"], PLUS)


def test_qsgd_rice_section_decodes_and_is_canonical() -> None:
    # Prepare
    pos = np.cumsum(np.array(RICE_RUNS) + 1) - 1
    q = np.zeros(800, dtype=np.int64)
    q[pos] = 1
    q4 = q.copy()
    q4[pos[[2, 9]]] = [3, -2]
    signs = [i == 9 for i in range(16)]
    s4 = rice_levels(RICE_RUNS, 5, [2, 6], 2, [1, 0], 0, signs)

    # Execute
    p = decode(header(codec=Codec.QSGD, numel=800, body=qsgd_body(1, 2, 1024, [1.0], rice_s1())))
    p4 = decode(header(codec=Codec.QSGD, numel=800, body=qsgd_body(4, 2, 1024, [1.0], s4)))

    # Assert
    assert p.body.q.tolist() == q.tolist()  # type: ignore[union-attr]
    assert p4.body.q.tolist() == q4.tolist()  # type: ignore[union-attr]
    assert compact.encode_levels(q, 1) == (compact.MODE_RICE_LEVELS, rice_s1())
    assert compact.encode_levels(q4, 4) == (compact.MODE_RICE_LEVELS, s4)


@pytest.mark.parametrize(
    ("levels", "section", "words"),
    [
        (1, rice_s1(b_run=4), ("non-canonical",)),  # b_run not the best
        (1, rice_s1(b_run=31), ("rice", "range")),
        (1, rice_levels(RICE_RUNS, 5, [3], 0, [0], 0, PLUS), ("magnitudes above 1", "s = 1")),
        (4, rice_levels(RICE_RUNS, 5, [16], 0, [0], 0, PLUS), ("exceeds", "fit")),  # 17th nonzero of 16
        (4, rice_levels(RICE_RUNS, 5, [3], 0, [3], 0, PLUS), ("exceeds", "fit")),  # magnitude 5 > s
        (1, rice_s1()[:-1], ("short", "fit")),
        (1, rice_s1() + b"\x00", ("trailing",)),
        (1, rice_levels([900], 5, [], 0, [], 0, [False]), ("exceeds", "fit", "numel")),  # run past numel
        (1, struct.pack("<IIBBB", 2**31, 0, 0, 0, 0), ("nonzero", "fit")),
        (1, b"\x01\x00\x00\x00\x00", ("short",)),
    ],
    ids=[
        "b-run",
        "b-run-range",
        "big-with-s1",
        "big-past-m",
        "beyond-levels",
        "truncated",
        "trailing",
        "past-numel",
        "huge-m",
        "no-head",
    ],
)
def test_qsgd_rice_stream_rules(levels: int, section: bytes, words: tuple[str, ...]) -> None:
    # Prepare
    body = qsgd_body(levels, 2, 1024, [1.0], section)

    # Execute / Assert
    expect_error(header(codec=Codec.QSGD, numel=800, body=body), *words)


# ------------------------------------------------------------------- positions (v3)


def topk_body(numel: int, mode: int, rice: int, section: bytes, k: int) -> bytes:
    return header(
        codec=Codec.TOPK, numel=numel, body=struct.pack(f"<IBB{k}f", k, mode, rice, *([1.0] * k)) + section
    )


def rice_section(gaps: list[int], b: int) -> bytes:
    w = BitWriter()
    w.rice(np.array(gaps), b)
    return w.getvalue()


def test_topk_rice_positions_decode_to_the_indices() -> None:
    # Prepare: gaps 3, 0, 17 -> indices 3, 4, 22 of 1000 (b = 2 is the encoder's choice)
    data = topk_body(1000, 0, 2, rice_section([3, 0, 17], 2), 3)

    # Execute
    p = decode(data)

    # Assert
    assert p.body.indices.tolist() == [3, 4, 22]  # type: ignore[union-attr]
    assert encode(p) == data


@pytest.mark.parametrize(
    ("numel", "mode", "rice", "section", "k", "words"),
    [
        (1000, 0, 2, rice_section([3, 0, 997], 2), 3, ("numel", "exceeds")),  # index 1002
        (1000, 0, 31, rice_section([3, 0, 17], 2), 3, ("rice",)),
        (1000, 0, 5, rice_section([3, 0, 17], 5), 3, ("non-canonical",)),
        (1000, 2, 0, rice_section([3, 0, 17], 2), 3, ("mode",)),
        (1000, 0, 2, rice_section([3, 0, 17], 2) + b"\x00", 3, ("trailing",)),
        (1000, 0, 2, rice_section([3, 0], 2), 3, ("short", "unary", "fit")),
        (1000, 0, 2, rice_section([3, 0, 17], 2)[:-1] + b"\xff", 3, ("padding", "non-canonical")),
        (10, 1, 0, bytes([0b1111_1111, 0b11]), 3, ("set bits",)),  # 10 set, k = 3
        (10, 1, 0, bytes([0b0000_0111, 0b0100]), 3, ("padding",)),
        (10, 1, 0, bytes([0b0000_0111]), 3, ("bitmap", "body")),
        (10, 1, 1, bytes([0b0000_0111, 0]), 3, ("rice",)),
        (1000, 1, 0, bytes([0b0000_0111]) + bytes(124), 3, ("non-canonical",)),  # Rice is smaller
    ],
    ids=[
        "past-numel",
        "rice-31",
        "rice-not-best",
        "mode-2",
        "trailing",
        "missing-gap",
        "padding",
        "bitmap-count",
        "bitmap-padding",
        "bitmap-short",
        "bitmap-rice-byte",
        "bitmap-not-smaller",
    ],
)
def test_position_rules(
    numel: int, mode: int, rice: int, section: bytes, k: int, words: tuple[str, ...]
) -> None:
    # Execute / Assert
    expect_error(topk_body(numel, mode, rice, section, k), *words)


def test_stc_positions_follow_the_signs() -> None:
    # Prepare: k = 2 at indices 1 and 6 of 8, first one negative; dense: bitmap wins
    body = struct.pack("<IfBB", 2, 0.5, 1, 0) + bytes([0b01, 0b0100_0010])

    # Execute
    p = decode(header(codec=Codec.STC, numel=8, body=body))

    # Assert
    assert isinstance(p.body, TernaryBody)
    assert p.body.indices.tolist() == [1, 6] and p.body.negative.tolist() == [True, False]


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
    "qsgd": (Codec.QSGD, MAX_NUMEL, struct.pack("<BBI", 4, 0, 1) + b"\x00" * 8),
    "qsgd-bucket": (Codec.QSGD, MAX_NUMEL, struct.pack("<BBIf", 4, 0, 65536, 1.0) + b"\x00" * 8),
    "topk": (Codec.TOPK, MAX_NUMEL, struct.pack("<IBB", 2**31 - 2, 0, 0) + b"\x00" * 8),
    "topk-bitmap": (Codec.TOPK, MAX_NUMEL, struct.pack("<IBBf", 1, 1, 0, 1.0) + b"\x01" * 8),
    "stc": (Codec.STC, MAX_NUMEL, struct.pack("<IfBB", 2**31 - 2, 1.0, 0, 0) + b"\x00" * 5),
    "stc-bitmap": (Codec.STC, MAX_NUMEL, struct.pack("<IfBB", 1, 1.0, 1, 0) + b"\x00" * 5),
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
    assert any(w in str(info.value) for w in ("bytes", "short", "needs", "not fit"))


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
        make(Codec.QSGD, QuantBody(torch.tensor([1.0, bad]), 2, torch.zeros(3, dtype=torch.int8), 2), 3),
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
        Codec.QSGD: make(codec, QuantBody(torch.tensor([big]), 2, torch.zeros(3, dtype=torch.int8), 4), 3),
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
        make(Codec.QSGD, QuantBody(torch.ones(1), 2, torch.tensor([0, 3, 0, 0], dtype=torch.int8), 4), 4),
        make(Codec.QSGD, QuantBody(torch.ones(1), 0, torch.zeros(4, dtype=torch.int8), 4), 4),
        make(Codec.QSGD, QuantBody(torch.ones(1), 2, torch.zeros(4, dtype=torch.int8), 2), 4),
        make(Codec.QSGD, QuantBody(torch.ones(4), 2, torch.zeros(4, dtype=torch.int8), 0), 4),
        make(Codec.QSGD, QuantBody(torch.ones(1), 2, torch.zeros(4, dtype=torch.int8), 65537), 4),
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
