"""Baseline compressors against independent NumPy references and the wire codec."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from e3sfc_core import baselines
from e3sfc_core.baselines import (
    FedAvgCompressor,
    QSGDCompressor,
    SignCompressor,
    STCCompressor,
    TopKCompressor,
    topk_count,
)
from e3sfc_core.compact import positions_bytes_bound as pos_bound
from e3sfc_core.compressor import COMPRESSORS, Budget, CompressorSettings, PayloadMeta
from e3sfc_core.errors import ConfigError, PayloadRejected
from e3sfc_core.payload import HEADER, HEADER_SIZE, MAGIC, Codec, Direction, FloatType, decode, encode

METHODS = ("fedavg", "topk", "stc", "signsgd", "qsgd")
CODECS = {
    "fedavg": Codec.DENSE,
    "topk": Codec.TOPK,
    "stc": Codec.STC,
    "signsgd": Codec.SIGN,
    "qsgd": Codec.QSGD,
}
EF = {"fedavg": False, "topk": True, "stc": True, "signsgd": True, "qsgd": False}
META = PayloadMeta(direction=Direction.UPLINK, server_round=3, base_digest=b"\x01" * 8)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class FlatModel(nn.Module):
    """Two parameters totalling ``numel`` weights (the compressors only count them)."""

    def __init__(self, numel: int, device: str = "cpu") -> None:
        super().__init__()
        a = numel // 3
        self.a = nn.Parameter(torch.zeros(a, device=device))
        self.b = nn.Parameter(torch.zeros(numel - a, device=device))


def make(method: str, **kw: object):
    return COMPRESSORS[method](CompressorSettings(**kw), (1, 28, 28), 10)


def target(numel: int, seed: int, device: str = "cpu") -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(numel).astype(np.float32) * rng.uniform(0.01, 3.0)
    return torch.from_numpy(t).to(device)


def wire(comp, payload, model, numel: int) -> torch.Tensor:
    """encode -> size check -> decode -> decompress, as the round logic does."""
    data = encode(payload)
    assert len(data) <= comp.encoded_size(numel, Budget())
    if comp.name in ("fedavg", "signsgd"):
        assert len(data) == comp.encoded_size(numel, Budget())
    got = comp.decompress(decode(data), model)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    return got


# ------------------------------------------------------------- NumPy references


def ref_k(ratio: float, n: int) -> int:
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def ref_topk(t: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.sort(np.argsort(-np.abs(t), kind="stable")[:k])
    out = np.zeros_like(t)
    out[idx] = t[idx]
    return idx, out


def ref_stc(t: np.ndarray, k: int) -> np.ndarray:
    idx, _ = ref_topk(t, k)
    mu = np.abs(t[idx].astype(np.float64)).mean()
    out = np.zeros(t.shape, np.float64)
    out[idx] = np.where(t[idx] < 0, -mu, mu)
    return out


def ref_sign(t: np.ndarray) -> np.ndarray:
    scale = np.abs(t.astype(np.float64)).sum() / t.size
    return np.where(t < 0, -scale, scale)


# ------------------------------------------------------------------------ tests


def test_registry_and_attributes() -> None:
    for m in METHODS:
        c = make(m)
        assert c.name == m and c.codec == CODECS[m] and c.uses_error_feedback is EF[m]
    assert set(METHODS) <= set(COMPRESSORS) and baselines.BASELINES == METHODS
    classes = (FedAvgCompressor, TopKCompressor, STCCompressor, SignCompressor, QSGDCompressor)
    for m, cls in zip(METHODS, classes, strict=True):
        assert type(make(m)) is cls


def test_topk_count() -> None:
    assert topk_count(0.01, 1000) == 10
    assert topk_count(0.07, 100) == 7  # 0.07 * 100 == 7.000000000000001 in binary
    assert topk_count(0.01, 55_210) == 553
    assert topk_count(1e-9, 10) == 1
    assert topk_count(1.0, 17) == 17
    for n in (1, 7, 1000, 55_210):
        for r in (0.001, 0.01, 0.1, 0.5, 1.0):
            assert topk_count(r, n) == ref_k(r, n)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(bad: float) -> None:
    with pytest.raises(ConfigError):
        make("topk", topk_ratio=bad)
    with pytest.raises(ConfigError):
        make("stc", topk_ratio=bad)


@pytest.mark.parametrize("bad", [0, 128, -1])
def test_bad_levels(bad: int) -> None:
    with pytest.raises(ConfigError):
        make("qsgd", qsgd_levels=bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1000, 55_210])
@pytest.mark.parametrize("f16", [False, True])
def test_fedavg(numel: int, f16: bool, device: str) -> None:
    comp, model, t = make("fedavg", float16=f16), FlatModel(numel, device), target(numel, 1, device)
    p, stats = comp.compress(t, model, META, Budget())
    assert stats.seconds >= 0 and p.float_type == (FloatType.FLOAT16 if f16 else FloatType.FLOAT32)
    got = wire(comp, p, model, numel)
    assert got.device.type == device
    tn, gn = t.cpu().numpy(), got.cpu().numpy()
    if f16:
        np.testing.assert_array_equal(gn, tn.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(gn, tn, rtol=1e-3, atol=1e-4)
    else:
        np.testing.assert_array_equal(gn, tn)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1000, 55_210])
@pytest.mark.parametrize("f16", [False, True])
def test_topk(numel: int, f16: bool, device: str) -> None:
    ratio = 0.01
    comp, model, t = (
        make("topk", topk_ratio=ratio, float16=f16),
        FlatModel(numel, device),
        target(numel, 2, device),
    )
    p, _ = comp.compress(t, model, META, Budget())
    assert p.codec == Codec.TOPK and (p.direction, p.server_round) == (Direction.UPLINK, 3)
    got = wire(comp, p, model, numel).cpu().numpy()
    k = ref_k(ratio, numel)
    idx, ref = ref_topk(t.cpu().numpy(), k)
    assert np.count_nonzero(got) == k
    np.testing.assert_array_equal(np.flatnonzero(got), idx)
    if f16:
        np.testing.assert_array_equal(got, ref.astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_array_equal(got, ref)
    size = len(encode(p))
    assert comp.encoded_size(numel, Budget()) == HEADER_SIZE + 6 + k * (2 if f16 else 4) + pos_bound(numel, k)
    # about log2(C(numel, k)) / k + 1.5 bits per Rice-coded position at 1% density
    positions = size - HEADER_SIZE - 6 - k * (2 if f16 else 4)
    assert 8 * positions <= k * (math.log2(numel / k) + 2.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1000, 55_210])
def test_stc(numel: int, device: str) -> None:
    ratio = 0.02
    comp, model, t = (
        make("stc", topk_ratio=ratio),
        FlatModel(numel, device),
        target(numel, 3, device),
    )
    p, _ = comp.compress(t, model, META, Budget())
    got = wire(comp, p, model, numel).cpu().numpy()
    k = ref_k(ratio, numel)
    ref = ref_stc(t.cpu().numpy(), k)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(ref))
    nz = got[got != 0]
    assert len(np.unique(np.abs(nz))) == 1  # every kept value is +-mu
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_array_equal(np.sign(got), np.sign(ref))
    assert comp.encoded_size(numel, Budget()) == HEADER_SIZE + 10 + math.ceil(k / 8) + pos_bound(numel, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1000, 55_210])
def test_signsgd(numel: int, device: str) -> None:
    comp, model, t = make("signsgd"), FlatModel(numel, device), target(numel, 4, device)
    t[::97] = 0.0  # zero counts as positive
    p, _ = comp.compress(t, model, META, Budget())
    got = wire(comp, p, model, numel).cpu().numpy()
    ref = ref_sign(t.cpu().numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert np.all(got[::97] > 0)
    assert len(np.unique(np.abs(got))) == 1
    assert comp.encoded_size(numel, Budget()) == HEADER_SIZE + 4 + math.ceil(numel / 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1000, 55_210])
@pytest.mark.parametrize("levels", [1, 16, 127])
@pytest.mark.parametrize("bucket", [512, 7, 65536])
def test_qsgd_reference(numel: int, levels: int, bucket: int, device: str) -> None:
    comp, model, t = (
        make("qsgd", qsgd_levels=levels, qsgd_bucket_size=bucket),
        FlatModel(numel, device),
        target(numel, 5, device),
    )
    p, _ = comp.compress(t, model, META, Budget())
    dec = decode(encode(p))
    tn = t.cpu().numpy().astype(np.float64)
    n_buckets = -(-numel // bucket)
    padded = np.zeros(n_buckets * bucket)
    padded[:numel] = tn
    norms = np.linalg.norm(padded.reshape(n_buckets, bucket), axis=1)
    got_norms = dec.body.norms.numpy().astype(np.float64)
    assert dec.body.levels == levels and dec.body.bucket_size == bucket
    assert np.all(got_norms >= norms) and np.allclose(got_norms, norms, rtol=1e-6)
    per_entry = np.repeat(got_norms, bucket)[:numel]
    q = dec.body.q.numpy().astype(np.int64)
    assert np.all(np.abs(q) <= levels)
    low = np.floor(levels * np.abs(tn) / per_entry)
    extra = np.abs(q) - low
    assert np.all((extra == 0) | (extra == 1))
    assert np.all((q == 0) | (np.sign(q) == np.sign(tn)))
    got = comp.decompress(dec, model).cpu().numpy()
    np.testing.assert_allclose(got, per_entry * q / levels, rtol=1e-6, atol=1e-12)
    width = math.ceil(math.log2(2 * levels + 1))
    bound = HEADER_SIZE + 6 + 4 * n_buckets + math.ceil(numel * width / 8)
    assert len(encode(p)) <= comp.encoded_size(numel, Budget()) == bound


def test_qsgd_levels_cost_far_less_than_a_byte() -> None:
    # Prepare: Gaussian target, paper settings (s = 16, buckets of 512)
    numel = 55_210
    comp, model, t = make("qsgd"), FlatModel(numel), target(numel, 12)

    # Execute
    size = len(encode(comp.compress(t, model, META, Budget())[0]))

    # Assert: under 3 bits per weight (v2 sent 8), norms included
    assert size < HEADER_SIZE + numel * 3 / 8


@pytest.mark.parametrize("bad", [0, 65537, -1])
def test_bad_bucket_size(bad: int) -> None:
    with pytest.raises(ConfigError):
        make("qsgd", qsgd_bucket_size=bad)


def test_qsgd_v2_payload_still_decompresses() -> None:
    # Prepare: one norm for the whole vector, one byte per weight (format v2)
    numel = 1000
    q = np.arange(numel) % 9 - 4
    body = struct.pack("<fB", 2.0, 4) + q.astype(np.int8).tobytes()
    data = HEADER.pack(MAGIC, 2, 0, int(Codec.QSGD), 1, 3, b"\x01" * 8, numel, len(body)) + body

    # Execute
    got = make("qsgd").decompress(decode(data), FlatModel(numel))

    # Assert
    np.testing.assert_allclose(got.numpy(), 2.0 * q / 4, rtol=1e-6)


@pytest.mark.parametrize("method", ["topk", "stc"])
@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("numel", [1000, 55_210])
def test_k_for_bytes_never_exceeds_the_target(method: str, f16: bool, numel: int) -> None:
    comp, model, t = make(method, float16=f16), FlatModel(numel), target(numel, 13)
    for nbytes in (10, 100, 700, 3000, 40_000, 10**7):
        k = comp.k_for_bytes(numel, nbytes)
        if k == 0:
            assert comp.size_for_k(numel, 0) > nbytes or nbytes < HEADER_SIZE + 10
            continue
        assert comp.size_for_k(numel, k) <= nbytes
        assert k == numel or comp.size_for_k(numel, k + 1) > nbytes
        sized = make(method, float16=f16, topk_ratio=k / numel)
        assert sized.k(numel) == k
        assert len(encode(sized.compress(t, model, META, Budget())[0])) <= nbytes


def test_qsgd_deterministic_and_seeded() -> None:
    numel = 1000
    comp, model, t = make("qsgd", seed=7), FlatModel(numel), target(numel, 6)
    q1 = comp.compress(t, model, META, Budget())[0].body.q
    q2 = comp.compress(t, model, META, Budget())[0].body.q
    assert torch.equal(q1, q2)
    other_round = PayloadMeta(Direction.UPLINK, 4, META.base_digest)
    other_dir = PayloadMeta(Direction.DOWNLINK, 3, META.base_digest)
    assert not torch.equal(q1, comp.compress(t, model, other_round, Budget())[0].body.q)
    assert not torch.equal(q1, comp.compress(t, model, other_dir, Budget())[0].body.q)
    q_seed = make("qsgd", seed=8).compress(t, model, META, Budget())[0].body.q
    assert not torch.equal(q1, q_seed)


def test_qsgd_unbiased() -> None:
    numel, n_draws = 1000, 1000
    comp, model, t = make("qsgd", qsgd_levels=16, seed=3), FlatModel(numel), target(numel, 7)
    acc = torch.zeros(numel, dtype=torch.float64)
    single_err = None
    for r in range(n_draws):
        meta = PayloadMeta(Direction.UPLINK, r, META.base_digest)
        rec = wire(comp, comp.compress(t, model, meta, Budget())[0], model, numel)
        acc += rec.double()
        if single_err is None:
            single_err = float((rec.double() - t.double()).norm() / t.double().norm())
    mean_err = float((acc / n_draws - t.double()).norm() / t.double().norm())
    assert single_err > 0.3  # one draw is noisy ...
    assert mean_err < 0.06  # ... the average converges to the target
    assert mean_err < single_err / 10


@pytest.mark.parametrize("method", ["topk", "stc", "signsgd"])
def test_error_feedback_accounting(method: str) -> None:
    numel, rounds = 1000, 6
    comp, model = make(method, topk_ratio=0.05), FlatModel(numel)
    residual = torch.zeros(numel)
    sent_sum, target_sum = (
        torch.zeros(numel, dtype=torch.float64),
        torch.zeros(numel, dtype=torch.float64),
    )
    for r in range(rounds):
        g = target(numel, 100 + r)
        tgt = g + residual
        meta = PayloadMeta(Direction.UPLINK, r, META.base_digest)
        sent = wire(comp, comp.compress(tgt, model, meta, Budget())[0], model, numel)
        if method == "topk":
            _, ref = ref_topk(tgt.numpy(), ref_k(0.05, numel))
            np.testing.assert_array_equal(sent.numpy(), ref)
            kept = sent != 0
            assert torch.all((tgt - sent)[kept] == 0)  # kept coordinates leave no residual
        residual = tgt - sent
        sent_sum += sent.double()
        target_sum += g.double()
    np.testing.assert_allclose((sent_sum + residual.double()).numpy(), target_sum.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("numel", [1, 9, 1000])
def test_zero_target(method: str, f16: bool, numel: int, device: str) -> None:
    comp, model = make(method, float16=f16, topk_ratio=0.1), FlatModel(numel, device)
    p, _ = comp.compress(torch.zeros(numel, device=device), model, META, Budget())
    got = wire(comp, p, model, numel)
    assert torch.all(torch.isfinite(got)) and torch.all(got == 0)
    if method == "stc":
        assert p.body.magnitude == 0.0 and p.body.indices.numel() == topk_count(0.1, numel)
    if method == "qsgd":
        assert torch.all(p.body.norms == 0.0)


@pytest.mark.parametrize("method", ["fedavg", "topk"])
def test_float16_halves_value_bytes(method: str) -> None:
    numel = 55_210
    t, model = target(numel, 8), FlatModel(numel)
    sizes = {}
    for f16 in (False, True):
        comp = make(method, float16=f16, topk_ratio=0.01)
        sizes[f16] = len(encode(comp.compress(t, model, META, Budget())[0]))
        assert sizes[f16] <= comp.encoded_size(numel, Budget())
    n_values = numel if method == "fedavg" else topk_count(0.01, numel)
    assert sizes[False] - sizes[True] == 2 * n_values  # the positions are the same


def test_float16_out_of_range_is_clamped() -> None:
    comp, model = make("fedavg", float16=True), FlatModel(4)
    t = torch.tensor([1e6, -1e6, 1.0, 0.0])
    got = wire(comp, comp.compress(t, model, META, Budget())[0], model, 4)
    assert got.tolist() == [65504.0, -65504.0, 1.0, 0.0]


@pytest.mark.parametrize("method", METHODS)
def test_rejects_wrong_codec_and_numel(method: str) -> None:
    numel = 1000
    comp, model, t = make(method), FlatModel(numel), target(numel, 9)
    p = decode(encode(comp.compress(t, model, META, Budget())[0]))
    with pytest.raises(PayloadRejected, match="numel"):
        comp.decompress(p, FlatModel(numel + 1))
    for other in METHODS:
        if other != method:
            with pytest.raises(PayloadRejected, match="codec"):
                make(other).decompress(p, model)


def test_compress_checks_target() -> None:
    comp = make("topk")
    with pytest.raises(ValueError, match="values"):
        comp.compress(torch.zeros(10), FlatModel(11), META, Budget())
    with pytest.raises(ValueError, match="NaN"):
        comp.compress(torch.tensor([1.0, float("nan")]), FlatModel(2), META, Budget())


@pytest.mark.parametrize("method", ["topk", "stc"])
def test_k_equals_numel(method: str) -> None:
    numel = 333
    comp, model, t = make(method, topk_ratio=1.0), FlatModel(numel), target(numel, 10)
    p, _ = comp.compress(t, model, META, Budget())
    assert p.body.indices.tolist() == list(range(numel))
    got = wire(comp, p, model, numel).numpy()
    if method == "topk":
        np.testing.assert_array_equal(got, t.numpy())
    else:
        np.testing.assert_allclose(got, ref_stc(t.numpy(), numel), rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cpu_and_cuda_agree(method: str) -> None:
    numel = 5000
    comp, t = make(method, topk_ratio=0.05), target(numel, 11)
    cpu = wire(comp, comp.compress(t, FlatModel(numel), META, Budget())[0], FlatModel(numel), numel)
    model = FlatModel(numel, "cuda")
    gpu = wire(comp, comp.compress(t.cuda(), model, META, Budget())[0], model, numel)
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-6, atol=1e-7)


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    values=st.lists(
        st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
        min_size=1,
        max_size=64,
    ),
    method=st.sampled_from(METHODS),
    f16=st.booleans(),
    ratio=st.sampled_from([0.01, 0.3, 1.0]),
    server_round=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_roundtrip_property(
    values: list[float], method: str, f16: bool, ratio: float, server_round: int
) -> None:
    numel = len(values)
    comp = make(method, float16=f16, topk_ratio=ratio)
    model, t = FlatModel(numel), torch.tensor(values, dtype=torch.float32)
    meta = PayloadMeta(Direction.DOWNLINK, server_round, b"\xab" * 8)
    p, _ = comp.compress(t, model, meta, Budget())
    data = encode(p)
    assert len(data) <= comp.encoded_size(numel, Budget())
    dec = decode(data)
    assert (dec.codec, dec.direction, dec.server_round, dec.base_digest, dec.numel) == (
        comp.codec,
        Direction.DOWNLINK,
        server_round,
        b"\xab" * 8,
        numel,
    )
    direct, via_wire = comp.decompress(p, model), comp.decompress(dec, model)
    assert torch.all(torch.isfinite(via_wire))
    assert torch.equal(direct, via_wire)
    if method in ("topk", "stc"):
        assert int((via_wire != 0).sum()) <= topk_count(ratio, numel)
    if method == "signsgd" and p.body.scale > 0:
        assert torch.all((via_wire < 0) == (t < 0))
