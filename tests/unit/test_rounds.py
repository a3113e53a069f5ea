"""Round pieces (e3sfc_core.rounds): payload checks, clipped aggregation, downlink replay,
and a FedAvg oracle for the whole plain-Python loop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from e3sfc_core.baselines import FedAvgCompressor
from e3sfc_core.compressor import Budget, Compressor, CompressorSettings, PayloadMeta
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.datasets import load_partition
from e3sfc_core.errors import BaseModelMismatch, DesyncError, PayloadError, PayloadRejected
from e3sfc_core.models import build_model
from e3sfc_core.payload import Codec, DenseBody, Direction, Payload, SyntheticBody, encode
from e3sfc_core.protocol import instruction_size, reply_size
from e3sfc_core.rounds import (
    Expectation,
    apply_downlink,
    check_payload,
    clip_and_average,
    compress_update,
    decompress_checked,
)
from e3sfc_core.seeds import SHUFFLE, derive_seed
from e3sfc_core.simulate import run_reference
from e3sfc_core.synthetic import SyntheticFeatureCompressor
from e3sfc_core.tensors import add_flat_, digest_flat, get_flat, num_params, set_flat
from e3sfc_core.training import train_local

SHAPE, CLASSES = (1, 8, 8), 10
CPU = torch.device("cpu")
DIGEST = b"\x11" * 8


# ------------------------------------------------------------------- check_payload


def dense(numel: int = 10, **changes: object) -> Payload:
    fields: dict[str, object] = {
        "codec": Codec.DENSE,
        "direction": Direction.UPLINK,
        "server_round": 3,
        "base_digest": DIGEST,
        "numel": numel,
        "body": DenseBody(torch.arange(numel, dtype=torch.float32)),
    }
    fields.update(changes)
    return Payload(**fields)  # type: ignore[arg-type]


def expectation(**changes: object) -> Expectation:
    fields: dict[str, object] = {
        "direction": Direction.UPLINK,
        "server_round": 3,
        "base_digest": DIGEST,
        "codec": Codec.DENSE,
        "numel": 10,
        "max_bytes": 28 + 40,
    }
    fields.update(changes)
    return Expectation(**fields)  # type: ignore[arg-type]


def test_check_payload_accepts_a_valid_payload() -> None:
    # Prepare
    data = encode(dense())

    # Execute
    p = check_payload(data, expectation())

    # Assert
    assert p.codec == Codec.DENSE
    torch.testing.assert_close(p.body.values, torch.arange(10, dtype=torch.float32))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("payload_changes", "expect_changes", "error", "word"),
    [
        ({"direction": Direction.DOWNLINK}, {}, PayloadRejected, "direction"),
        ({"server_round": 2}, {}, PayloadRejected, "round"),
        ({}, {"codec": Codec.TOPK}, PayloadRejected, "codec"),
        ({"codec": Codec.WEIGHTS}, {}, PayloadRejected, "codec"),
        ({"numel": 9, "body": DenseBody(torch.ones(9))}, {}, PayloadRejected, "numel"),
        ({"base_digest": b"\x22" * 8}, {}, BaseModelMismatch, "digest"),
        ({}, {"max_bytes": 28 + 39}, PayloadRejected, "bytes"),
    ],
    ids=["direction", "round", "codec-expected", "codec-sent", "numel", "digest", "bytes"],
)
def test_check_payload_rules(
    payload_changes: dict[str, object], expect_changes: dict[str, object], error: type, word: str
) -> None:
    # Prepare
    data = encode(dense(**payload_changes))

    # Execute
    with pytest.raises(PayloadError) as info:
        check_payload(data, expectation(**expect_changes))

    # Assert
    assert type(info.value) is error
    assert word in str(info.value)


def test_check_payload_rejects_too_many_synthetic_samples() -> None:
    # Prepare
    body = SyntheticBody(1.0, torch.ones(3, 2), torch.ones(3, 2))
    data = encode(dense(codec=Codec.SYNTHETIC, body=body))
    expect = expectation(codec=Codec.SYNTHETIC, max_bytes=10_000)

    # Execute / Assert
    assert check_payload(data, expectation(codec=Codec.SYNTHETIC, max_bytes=10_000, max_samples=3))
    with pytest.raises(PayloadRejected, match="samples"):
        check_payload(data, Expectation(**{**expect.__dict__, "max_samples": 2}))


def test_check_payload_size_is_checked_before_decoding() -> None:
    # Prepare: garbage that is also too long
    data = b"\xff" * 1000

    # Execute / Assert
    with pytest.raises(PayloadRejected, match="bytes"):
        check_payload(data, expectation())
    with pytest.raises(PayloadError, match="magic"):
        check_payload(data[:60], expectation())


def test_decompress_checked_rejects_non_finite_updates() -> None:
    # Prepare
    class Broken:
        def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
            return torch.tensor([1.0, float("nan")])

    # Execute / Assert
    with pytest.raises(PayloadRejected, match="NaN"):
        decompress_checked(Broken(), dense(), nn.Linear(1, 1))  # type: ignore[arg-type]


# -------------------------------------------------------------- clip_and_average


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_average_is_weighted_by_examples() -> None:
    # Prepare
    a, b = vec(1.0, 0.0, 2.0), vec(0.0, 4.0, -2.0)

    # Execute
    mean, clipped = clip_and_average([a, b], [1, 3], clip_factor=0.0)

    # Assert
    torch.testing.assert_close(mean, (a + 3 * b) / 4)
    assert clipped == 0


def test_outlier_is_clipped_to_factor_times_median() -> None:
    # Prepare
    g = torch.Generator().manual_seed(0)
    ups = [torch.randn(50, generator=g) for _ in range(4)]
    norms = [float(u.norm()) for u in ups]
    abusive = ups[2] * 1000
    updates = [ups[0], ups[1], abusive, ups[3]]
    median = float(torch.tensor([norms[0], norms[1], norms[2] * 1000, norms[3]]).median())
    weights = [10.0, 20.0, 30.0, 40.0]

    # Execute
    mean, clipped = clip_and_average(updates, weights, clip_factor=2.0)

    # Assert
    bound = 2.0 * median
    expected_clipped = [u * (bound / float(u.norm())) if float(u.norm()) > bound else u for u in updates]
    expected = sum(u * (w / 100.0) for u, w in zip(expected_clipped, weights, strict=True))
    assert clipped == sum(1 for u in updates if float(u.norm()) > bound) >= 1
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
    assert float(mean.norm()) < 3 * max(norms)


def test_clipped_norm_equals_bound() -> None:
    # Prepare
    updates = [vec(3.0, 4.0), vec(0.0, 5.0), vec(5000.0, 0.0)]  # norms 5, 5, 5000

    # Execute
    mean, clipped = clip_and_average(updates, [1, 1, 1], clip_factor=3.0)

    # Assert: the outlier contributes a norm-15 vector along its own direction
    assert clipped == 1
    torch.testing.assert_close(mean, (vec(3.0, 4.0) + vec(0.0, 5.0) + vec(15.0, 0.0)) / 3)


def test_clip_factor_zero_disables_clipping() -> None:
    # Prepare
    updates = [vec(3.0, 4.0), vec(0.0, 5.0), vec(5000.0, 0.0)]

    # Execute
    mean, clipped = clip_and_average(updates, [1, 1, 2], clip_factor=0.0)

    # Assert
    assert clipped == 0
    torch.testing.assert_close(mean, (vec(3.0, 4.0) + vec(0.0, 5.0) + 2 * vec(5000.0, 0.0)) / 4)


def test_single_update_and_empty_list() -> None:
    # Execute
    mean, clipped = clip_and_average([vec(100.0)], [5], clip_factor=1.0)

    # Assert
    torch.testing.assert_close(mean, vec(100.0))
    assert clipped == 0
    with pytest.raises(ValueError):
        clip_and_average([], [], clip_factor=1.0)


def test_all_zero_updates_are_not_clipped() -> None:
    # Execute
    mean, clipped = clip_and_average([torch.zeros(3), torch.zeros(3)], [1, 1], clip_factor=3.0)

    # Assert
    assert clipped == 0
    assert torch.count_nonzero(mean) == 0


# ------------------------------------------------------------------ apply_downlink


@dataclass(frozen=True)
class Chain:
    compressor: Compressor
    weights: list[torch.Tensor]  # W0, W1, W2
    payloads: list[bytes]  # W0 -> W1, W1 -> W2

    def digest(self, i: int) -> bytes:
        return digest_flat(self.weights[i])


def client_model(weights: torch.Tensor) -> nn.Module:
    model = build_model("mlp", SHAPE, CLASSES, seed=123)
    set_flat(model, weights)
    model.eval()
    return model


def make_chain(method: str) -> Chain:
    """Server side: two rounds of downlink payloads, applied like FederatedServer._apply."""
    settings = CompressorSettings(seed=7, max_evals=5)
    comp: Compressor = (
        FedAvgCompressor(settings)
        if method == "fedavg"
        else SyntheticFeatureCompressor(settings, SHAPE, CLASSES)
    )
    server = build_model("mlp", SHAPE, CLASSES, seed=0)
    server.eval()
    g = torch.Generator().manual_seed(1)
    weights, payloads = [get_flat(server)], []
    for rnd in (1, 2):
        mean = torch.randn(num_params(server), generator=g) * 1e-2
        meta = PayloadMeta(Direction.DOWNLINK, rnd, digest_flat(get_flat(server)))
        enc = compress_update(comp, mean, server, meta, Budget(1))
        add_flat_(server, enc.transmitted)
        weights.append(get_flat(server))
        payloads.append(enc.data)
    assert len({digest_flat(w) for w in weights}) == 3
    return Chain(comp, weights, payloads)


@pytest.fixture(scope="module", params=["fedavg", "3sfc"])
def chain(request: pytest.FixtureRequest) -> Chain:
    return make_chain(request.param)


def test_replay_of_two_payloads_reaches_the_target(chain: Chain) -> None:
    # Prepare
    model = client_model(chain.weights[0])

    # Execute
    applied = apply_downlink(model, chain.payloads, chain.compressor, chain.digest(2))

    # Assert
    assert applied == 2
    assert digest_flat(get_flat(model)) == chain.digest(2)
    torch.testing.assert_close(get_flat(model), chain.weights[2], rtol=0, atol=0)


def test_client_further_ahead_skips_what_it_has(chain: Chain) -> None:
    # Prepare
    at_one, at_two = client_model(chain.weights[1]), client_model(chain.weights[2])

    # Execute
    from_one = apply_downlink(at_one, chain.payloads, chain.compressor, chain.digest(2))
    from_two = apply_downlink(at_two, chain.payloads, chain.compressor, chain.digest(2))

    # Assert
    assert (from_one, from_two) == (1, 0)
    assert digest_flat(get_flat(at_one)) == digest_flat(get_flat(at_two)) == chain.digest(2)


def test_weights_payload_resyncs_a_drifted_client(chain: Chain) -> None:
    # Prepare
    drifted = client_model(chain.weights[0] + 1e-3)
    full = encode(
        Payload(
            codec=Codec.WEIGHTS,
            direction=Direction.DOWNLINK,
            server_round=2,
            base_digest=chain.digest(2),
            numel=chain.weights[2].numel(),
            body=DenseBody(chain.weights[2]),
        )
    )

    # Execute
    applied = apply_downlink(drifted, [full], chain.compressor, chain.digest(2))

    # Assert
    assert applied == 1
    assert digest_flat(get_flat(drifted)) == chain.digest(2)


@pytest.mark.parametrize("case", ["missing-first", "drifted", "wrong-target", "reversed"])
def test_wrong_chain_raises_desync(chain: Chain, case: str) -> None:
    # Prepare
    start = chain.weights[0] + (1e-3 if case == "drifted" else 0.0)
    model = client_model(start)
    payloads = {
        "missing-first": chain.payloads[1:],
        "drifted": chain.payloads,
        "wrong-target": chain.payloads,
        "reversed": chain.payloads[::-1],
    }[case]
    target = b"\x00" * 8 if case == "wrong-target" else chain.digest(2)

    # Execute / Assert
    with pytest.raises(DesyncError, match="digest"):
        apply_downlink(model, payloads, chain.compressor, target)


def test_uplink_payload_in_downlink_is_rejected(chain: Chain) -> None:
    # Prepare
    model = client_model(chain.weights[0])
    up = encode(
        dense(
            numel=num_params(model),
            direction=Direction.UPLINK,
            base_digest=chain.digest(0),
            body=DenseBody(torch.zeros(num_params(model))),
        )
    )

    # Execute / Assert
    with pytest.raises(PayloadRejected, match="downlink"):
        apply_downlink(model, [up], chain.compressor, chain.digest(1))
    with pytest.raises(PayloadError):
        apply_downlink(model, [b"garbage"], chain.compressor, chain.digest(1))


# ------------------------------------------------------------ FedAvg oracle (loop)


def test_run_reference_fedavg_equals_weighted_mean_of_local_updates(tmp_path) -> None:
    # Prepare
    cfg = ExperimentConfig.from_run_config(
        {
            "method": "fedavg",
            "downlink": "dense",
            "num-rounds": 2,
            "num-partitions": 3,
            "min-train-nodes": 3,
            "fraction-train": 1.0,
            "local-epochs": 1,
            "clip-norm-factor": 0.0,
            "seed": 5,
            "device": "cpu",
            "output-dir": str(tmp_path / "out"),
        }
    )
    parts = [
        load_partition("digits", pid, 3, alpha=cfg.dirichlet_alpha, seed=cfg.seed, data_root=tmp_path)
        for pid in range(3)
    ]
    oracle = build_model(cfg.model, SHAPE, CLASSES, cfg.seed)
    numel = num_params(oracle)
    for rnd in (1, 2):
        base = get_flat(oracle)
        updates, sizes = [], []
        for pid, data in enumerate(parts):
            local = build_model(cfg.model, SHAPE, CLASSES, cfg.seed)
            set_flat(local, base)
            seed = derive_seed(cfg.seed, SHUFFLE, rnd, pid)
            train_local(local, data, epochs=1, lr=cfg.lr, batch_size=cfg.batch_size, device=CPU, seed=seed)
            updates.append(get_flat(local) - base)
            sizes.append(len(data))
        total = float(sum(sizes))
        mean = sum(u * (n / total) for u, n in zip(updates, sizes, strict=True))
        add_flat_(oracle, mean)

    # Execute
    exp, summary = run_reference(cfg, base_dir=tmp_path)

    # Assert
    torch.testing.assert_close(get_flat(exp.server.model), get_flat(oracle), rtol=0, atol=0)
    dense = 28 + 4 * numel  # one dense float32 payload
    assert [r.uplink_bytes for r in exp.server.records] == [3 * reply_size(dense)] * 2
    # downlink: nothing in round 1 (the seed builds the model), one dense payload per
    # client in round 2 (a dense downlink keeps no replay history)
    downs = [r.downlink_bytes for r in exp.server.records]
    assert downs == [3 * instruction_size([]), 3 * instruction_size([dense])]
    assert [r.accepted for r in exp.server.records] == [3, 3]
    assert summary["total_bytes"] == sum(r.uplink_bytes + r.downlink_bytes for r in exp.server.records)
