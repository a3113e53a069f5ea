"""What makes 3SFC hold up across models (issue 10): per-layer scales, the bounded
residual, the float16 clamp and reconstruction that is exact across thread counts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from e3sfc_core import synthetic
from e3sfc_core.client import client_compressor
from e3sfc_core.compressor import Budget, CompressorSettings, PayloadMeta
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.datasets import load_partition
from e3sfc_core.errors import ConfigError, PayloadRejected
from e3sfc_core.models import build_model
from e3sfc_core.payload import Codec, Direction, SyntheticBody, decode, encode
from e3sfc_core.protocol import instruction_size
from e3sfc_core.rounds import apply_downlink, bounded_residual, compress_update, exact_decompress
from e3sfc_core.simulate import run_reference
from e3sfc_core.synthetic import SyntheticFeatureCompressor
from e3sfc_core.synthetic_gradient import apply_layer_scales, parameter_sizes, synthesize_update
from e3sfc_core.tensors import digest_flat, get_flat, set_flat
from e3sfc_core.training import train_local

SHAPE, CLASSES = (1, 8, 8), 10
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Setup:
    model: nn.Module
    update: torch.Tensor
    meta: PayloadMeta


@pytest.fixture(scope="module", params=["mlp", "convnet"])
def setup(request: pytest.FixtureRequest) -> Setup:
    """A real one-epoch update of client 0 on digits, at the seed-0 weights."""
    data = load_partition("digits", 0, 10, alpha=1.0, seed=0, data_root="unused")
    model = build_model(request.param, SHAPE, CLASSES, seed=0)
    base = get_flat(model)
    train_local(model, data, epochs=1, lr=0.05, batch_size=32, device=CPU, seed=1)
    update = get_flat(model) - base
    set_flat(model, base)
    model.eval()
    return Setup(model, update, PayloadMeta(Direction.UPLINK, 2, digest_flat(base)))


def layered(model: nn.Module, **kw: object) -> SyntheticFeatureCompressor:
    settings = CompressorSettings(scale_mode="layer", layer_count=len(parameter_sizes(model)), **kw)  # type: ignore[arg-type]
    return SyntheticFeatureCompressor(settings, SHAPE, CLASSES)


# -------------------------------------------------------------------- per-layer scales


def test_layer_payload_has_one_scale_per_parameter_tensor_and_exact_size(setup: Setup) -> None:
    # Prepare
    c = layered(setup.model, seed=1, max_evals=5)

    # Execute
    payload, _ = c.compress(setup.update, setup.model, setup.meta, Budget(2))
    data = encode(payload)

    # Assert
    body = decode(data).body
    assert isinstance(body, SyntheticBody) and body.layer_scales is not None
    assert body.layer_scales.numel() == len(parameter_sizes(setup.model))
    assert len(data) == c.encoded_size(setup.update.numel(), Budget(2))


def test_layer_residual_is_orthogonal_to_what_was_sent_in_every_layer(setup: Setup) -> None:
    # Prepare
    c = layered(setup.model, seed=2, max_evals=5)

    # Execute
    enc = compress_update(c, setup.update, setup.model, setup.meta, Budget(1))

    # Assert: each block's scale is that block's least-squares fit
    sizes = parameter_sizes(setup.model)
    blocks = zip(
        enc.residual.split(sizes), enc.transmitted.split(sizes), setup.update.split(sizes), strict=True
    )
    for r, u, t in blocks:
        bound = 1e-4 * float(t.norm()) * float(u.norm()) + 1e-12
        assert abs(float(torch.dot(r.double(), u.double()))) <= bound


def test_layer_scales_never_leave_a_larger_residual_than_one_scale(setup: Setup) -> None:
    # Prepare: one synthetic batch, reconstructed both ways
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, *SHAPE, generator=g), torch.randn(2, CLASSES, generator=g)
    grad = synthesize_update(setup.model, x, y, 1.0)
    t = setup.update
    sizes = parameter_sizes(setup.model)

    # Execute
    scales, degenerate = synthetic._layer_scales(grad, t, sizes)
    per_layer = apply_layer_scales(grad, scales, sizes)
    one = grad * (float(torch.dot(grad, t)) / float(torch.dot(grad, grad)))

    # Assert
    assert not degenerate
    assert float((t - per_layer).norm()) <= float((t - one).norm()) * (1 + 1e-6)


def test_reconstruction_splits_the_target_like_a_projection(setup: Setup) -> None:
    # Prepare
    c = layered(setup.model, seed=4, max_evals=8)

    # Execute
    enc = compress_update(c, setup.update, setup.model, setup.meta, Budget(1))

    # Assert: per-layer least squares leave |t|^2 = |u|^2 + |r|^2, so cos^2 + ratio^2 = 1
    assert 0.0 < enc.cosine <= 1.0
    t, u = setup.update.double(), enc.transmitted.double()
    torch.testing.assert_close(enc.residual_ratio, float((t - u).norm() / t.norm()), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(enc.cosine**2 + enc.residual_ratio**2, 1.0, rtol=1e-4, atol=1e-4)


def test_wrong_number_of_layer_scales_is_rejected(setup: Setup) -> None:
    # Prepare
    c = layered(setup.model, seed=1, max_evals=2)
    payload, _ = c.compress(setup.update, setup.model, setup.meta, Budget(1))
    body = payload.body
    assert isinstance(body, SyntheticBody) and body.layer_scales is not None
    bad = SyntheticBody(body.scale, body.inputs, body.labels, body.layer_scales[:-1])
    mutated = decode(encode(type(payload)(**{**vars(payload), "body": bad})))

    # Execute / Assert
    with pytest.raises(PayloadRejected, match="layer scales"):
        c.decompress(mutated, setup.model)


def test_layer_mode_needs_the_layer_count_to_size_payloads() -> None:
    # Prepare
    c = SyntheticFeatureCompressor(CompressorSettings(scale_mode="layer"), SHAPE, CLASSES)

    # Execute / Assert
    with pytest.raises(ConfigError, match="layer_count"):
        c.encoded_size(100, Budget(1))


# ------------------------------------------------------------------ bounded residual


def test_bounded_residual_caps_the_norm_and_keeps_the_direction() -> None:
    # Prepare
    update = torch.tensor([3.0, 4.0])  # norm 5
    residual = torch.tensor([0.0, 20.0])

    # Execute
    capped = bounded_residual(residual, update, 2.0)

    # Assert
    torch.testing.assert_close(capped, torch.tensor([0.0, 10.0]))


@pytest.mark.parametrize(("cap", "residual"), [(0.0, [0.0, 1e6]), (2.0, [0.0, 9.0]), (2.0, [0.0, 0.0])])
def test_bounded_residual_leaves_small_or_uncapped_residuals_alone(cap: float, residual: list[float]) -> None:
    # Prepare
    r = torch.tensor(residual)

    # Execute
    out = bounded_residual(r, torch.tensor([3.0, 4.0]), cap)

    # Assert
    assert out is r


# ------------------------------------------------------------------ float16 clamp


def test_float16_clamps_inputs_beyond_its_range(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a search that wandered past float16's largest value (65504)
    c = SyntheticFeatureCompressor(CompressorSettings(float16=True, seed=1), SHAPE, CLASSES)
    x = torch.full((1, *SHAPE), 1e6)
    x[0, 0, 0, 0] = -1e6
    y = torch.randn(1, CLASSES)
    monkeypatch.setattr(c, "_search", lambda *args: (x, y, 1))

    # Execute
    enc = compress_update(c, setup.update, setup.model, setup.meta, Budget(1))

    # Assert: no inf on the wire, a finite update, and the residual still balances
    body = decode(enc.data).body
    assert isinstance(body, SyntheticBody)
    assert float(body.inputs.abs().max()) == 65504.0
    assert torch.isfinite(enc.transmitted).all()
    torch.testing.assert_close(enc.residual, setup.update - enc.transmitted, rtol=0, atol=0)


# --------------------------------------------------- exact across thread counts


def test_residual_balances_against_a_receiver_with_other_threads(setup: Setup) -> None:
    # Prepare: the sender compresses with 2 threads, the receiver decodes with 1
    c = layered(setup.model, seed=3, max_evals=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        enc = compress_update(c, setup.update, setup.model, setup.meta, Budget(2))
    finally:
        torch.set_num_threads(threads)

    # Execute
    received = exact_decompress(c, decode(enc.data), setup.model)

    # Assert: bit for bit, the residual is the target minus what the receiver applies
    assert torch.equal(received, enc.transmitted)
    assert torch.equal(enc.residual, setup.update - received)


# ------------------------------------------------------------------ relayed downlink


def small_run(tmp_path: object, **over: object) -> ExperimentConfig:
    """A cheap in-process run: one synthetic sample, a short search, one thread."""
    base = {"synthetic-samples": 1, "num-threads": 1, "output-dir": str(tmp_path)}
    return ExperimentConfig.from_run_config({**base, **over})


def test_relayed_downlink_replays_to_the_servers_exact_weights(tmp_path: object) -> None:
    # Prepare: half the clients per round, so others must catch up by replaying bundles
    cfg = small_run(
        tmp_path,
        downlink="relay",
        **{"num-rounds": 3, "num-partitions": 4, "fraction-train": 0.5, "max-evals": 3},
    )

    # Execute: the run, then a fresh client replaying every relayed downlink in order
    exp, _ = run_reference(cfg)
    server = exp.server
    spec = exp.spec
    model = build_model(cfg.model, tuple(spec.input_shape), spec.n_classes, cfg.seed)
    payloads = [server.history[v] for v in sorted(server.history)]
    compressor = client_compressor(cfg, spec, 0, len(parameter_sizes(model)))
    apply_downlink(model, payloads, compressor, server.digest)

    # Assert: no client ever desynced, and the replay lands on the server's bits
    assert all(r.desynced == 0 and r.accepted == 2 for r in server.records)
    assert all(decode(p).codec == Codec.BUNDLE for p in payloads)
    assert digest_flat(get_flat(model)) == server.digest


def test_relay_with_a_byte_budget_is_refused() -> None:
    with pytest.raises(ConfigError, match="relay"):
        ExperimentConfig.from_run_config({"downlink": "relay", "budget-total-bytes": 100_000})


@pytest.mark.parametrize(
    ("overrides", "bundle", "expected"),
    [
        ({}, 200, True),  # auto, e3sfc: 200 B <= 2% of 10,000 B
        ({}, 201, False),
        ({"relay-max-fraction": 0.0}, 1, False),
        ({"budget-total-bytes": 10**6}, 1, False),  # the scheduler plans compressed payloads
        ({"method": "topk"}, 1, False),
        ({"downlink": "relay"}, 10**9, True),
        ({"downlink": "compressed"}, 1, False),
    ],
)
def test_when_the_downlink_is_relayed(overrides: dict[str, object], bundle: int, expected: bool) -> None:
    # Prepare
    cfg = ExperimentConfig.from_run_config(overrides)

    # Execute / Assert
    assert cfg.relays(bundle, 10_000) is expected


def test_downlink_samples_sizes_the_servers_payload(tmp_path: object) -> None:
    # Prepare: uplink n = 1, compressed downlink n = 3
    cfg = small_run(
        tmp_path,
        downlink="compressed",
        **{"downlink-samples": 3, "num-rounds": 2, "num-partitions": 2, "max-evals": 2},
    )

    # Execute
    exp, _ = run_reference(cfg)

    # Assert: round 2 sends each of the 2 clients round 1's payload, sized for 3 samples
    # (within that bound: the correction's positions are Rice-coded, and with this short
    # search the sender may send the Top-k alone in the same bytes); uplinks use 1
    second = exp.server.records[1]
    assert (second.n_uplink, second.n_downlink) == (1, 3)
    sent = exp.server.history[1]
    assert second.downlink_bytes == 2 * instruction_size([len(sent)])
    assert exp.server.payload_size(1) < len(sent) <= exp.server.payload_size(3)
