"""PowerSGD baseline (e3sfc_core.powersgd): rank-r reconstruction, dense pass-through,
error feedback, exact sizes, strict layouts and a short federated run on digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from e3sfc_core.compressor import COMPRESSORS, Budget, CompressorSettings, PayloadMeta, build_compressor
from e3sfc_core.config import METHODS, ExperimentConfig
from e3sfc_core.datasets import get_spec
from e3sfc_core.errors import ConfigError, PayloadRejected
from e3sfc_core.lowrank import LowRankBody
from e3sfc_core.models import build_model
from e3sfc_core.payload import Codec, Direction, decode, encode
from e3sfc_core.powersgd import PowerSGDCompressor, plan_layout
from e3sfc_core.rounds import compress_update
from e3sfc_core.seeds import POWERSGD, derive_seed
from e3sfc_core.simulate import run_reference
from e3sfc_core.tensors import num_params

META = PayloadMeta(direction=Direction.UPLINK, server_round=3, base_digest=b"\x01" * 8)


class Net(nn.Module):
    """A 30x40 matrix, its bias, a 3x3 matrix (too small for rank 4) and a 4-D kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(30, 40))
        self.b = nn.Parameter(torch.zeros(30))
        self.small = nn.Parameter(torch.zeros(3, 3))
        self.conv = nn.Parameter(torch.zeros(16, 8, 3, 3))


SHAPES = [(30, 40), (30,), (3, 3), (16, 8, 3, 3)]


def comp(rank: int = 4, float16: bool = False) -> PowerSGDCompressor:
    return PowerSGDCompressor(CompressorSettings(powersgd_rank=rank, float16=float16), SHAPES)


def blocks(flat: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in SHAPES:
        n = int(torch.tensor(shape).prod())
        out.append(flat[offset : offset + n].view(shape))
        offset += n
    return out


def wire(c: PowerSGDCompressor, target: torch.Tensor, model: nn.Module) -> torch.Tensor:
    payload, _ = c.compress(target, model, META, Budget())
    data = encode(payload)
    assert len(data) == c.encoded_size(target.numel(), Budget())
    return c.decompress(decode(data), model)


def low_rank_target(rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [
        (torch.randn(30, rank, generator=g) @ torch.randn(rank, 40, generator=g)).reshape(-1),
        torch.randn(30, generator=g),
        torch.randn(9, generator=g),
        (torch.randn(16, rank, generator=g) @ torch.randn(rank, 72, generator=g)).reshape(-1),
    ]
    return torch.cat(parts)


def test_plan_layout_sends_vectors_and_small_matrices_dense() -> None:
    # Execute / Assert: (rows, cols, rank); rank 0 is dense
    assert plan_layout(SHAPES, 4) == ((30, 40, 4), (30, 1, 0), (3, 3, 0), (16, 72, 4))
    assert plan_layout([(3, 3)], 1) == ((3, 3, 1),)  # 6 < 9 floats
    assert plan_layout([(2, 2), (0, 5), ()], 1) == ((2, 2, 0), (1, 1, 0))  # 4 == 4: dense; empty: none


@pytest.mark.parametrize("true_rank", [1, 2, 4])
def test_exactly_low_rank_matrices_are_reconstructed(true_rank: int) -> None:
    # Prepare
    model, target = Net(), low_rank_target(true_rank)

    # Execute
    got = wire(comp(4), target, model)

    # Assert: rank-r of a rank <= r matrix is exact up to float error; dense parts bit-exact
    torch.testing.assert_close(got, target, rtol=1e-4, atol=1e-4)
    assert torch.equal(blocks(got)[1], blocks(target)[1])
    assert torch.equal(blocks(got)[2], blocks(target)[2])


def test_a_full_rank_matrix_gets_a_rank_r_approximation() -> None:
    # Prepare
    model = Net()
    target = torch.randn(num_params(model), generator=torch.Generator().manual_seed(1))

    # Execute
    got = blocks(wire(comp(4), target, model))

    # Assert: rank 4, closer to the target than nothing, dense parts exact
    assert int(torch.linalg.matrix_rank(got[0])) == 4
    w = blocks(target)[0]
    assert float((got[0] - w).norm()) < float(w.norm())
    assert torch.equal(got[1], blocks(target)[1])


def test_error_feedback_identity_and_determinism() -> None:
    # Prepare
    model, c = Net(), comp(2)
    target = torch.randn(num_params(model), generator=torch.Generator().manual_seed(2))

    # Execute
    enc = compress_update(c, target, model, META, Budget())
    again = compress_update(c, target, model, META, Budget())
    later = compress_update(c, target, model, PayloadMeta(Direction.UPLINK, 4, META.base_digest), Budget())

    # Assert
    assert c.uses_error_feedback
    torch.testing.assert_close(enc.transmitted + enc.residual, target, rtol=0, atol=1e-6)
    assert float(enc.residual.norm()) > 0
    assert enc.data == again.data  # Q0 depends on (seed, round, direction, index) only
    assert enc.data != later.data
    assert (
        derive_seed(0, POWERSGD, 3, 0, 0)
        != derive_seed(0, POWERSGD, 3, 0, 1)
        != derive_seed(0, POWERSGD, 3, 1, 1)
    )


def test_float16_wire_and_zero_target() -> None:
    # Prepare
    model, c = Net(), comp(4, float16=True)
    target = low_rank_target(1) * 1e-3

    # Execute
    got = wire(c, target, model)
    zero = wire(c, torch.zeros_like(target), model)

    # Assert
    assert decode(encode(c.compress(target, model, META, Budget())[0])).float_type.name == "FLOAT16"
    torch.testing.assert_close(got, target, rtol=0, atol=2e-5)
    assert torch.equal(zero, torch.zeros_like(target))


@pytest.mark.parametrize(("model_name", "float16"), [("mlp", False), ("convnet", True)])
def test_encoded_size_is_exact_for_zoo_models(model_name: str, float16: bool) -> None:
    # Prepare: the registry sizes payloads from the model named in the settings
    spec = get_spec("digits")
    settings = CompressorSettings(model=model_name, float16=float16)
    c = build_compressor("powersgd", settings, spec)
    model = build_model(model_name, spec.input_shape, spec.n_classes, seed=0)
    n = num_params(model)
    target = torch.randn(n, generator=torch.Generator().manual_seed(3))

    # Execute
    payload, _ = c.compress(target, model, META, Budget())
    data = encode(payload)

    # Assert
    assert len(data) == c.encoded_size(n, Budget()) < (2 if float16 else 4) * n
    assert c.codec == Codec.LOWRANK and payload.codec == Codec.LOWRANK


def test_configuration_is_validated() -> None:
    # Execute / Assert
    for bad in (0, 1025):
        with pytest.raises(ConfigError):
            comp(bad)
        with pytest.raises(ConfigError):
            ExperimentConfig.from_run_config({"method": "powersgd", "powersgd-rank": bad})
    cfg = ExperimentConfig.from_run_config({"method": "powersgd", "powersgd-rank": 2, "model": "lenet5"})
    assert "powersgd" in METHODS and "powersgd" in COMPRESSORS
    assert cfg.compressor_settings().powersgd_rank == 2 and cfg.compressor_settings().model == "lenet5"
    assert not cfg.compress_downlink and not cfg.uses_float16
    with pytest.raises(ConfigError, match="shapes"):
        PowerSGDCompressor(CompressorSettings()).encoded_size(100, Budget())
    with pytest.raises(ConfigError, match="numel"):
        comp().encoded_size(100, Budget())


def test_payloads_of_another_rank_or_model_are_rejected() -> None:
    # Prepare
    model = Net()
    target = torch.randn(num_params(model), generator=torch.Generator().manual_seed(4))
    rank2 = decode(encode(comp(2).compress(target, model, META, Budget())[0]))

    # Execute / Assert
    with pytest.raises(PayloadRejected, match="layout"):
        comp(4).decompress(rank2, model)
    with pytest.raises(ConfigError, match="shapes"):
        comp(4).compress(torch.zeros(8), nn.Linear(3, 2), META, Budget())
    assert isinstance(rank2.body, LowRankBody)


def test_short_federated_run_learns(tmp_path: Path) -> None:
    # Prepare: digits MLP, uplink PowerSGD, then also the compressed downlink
    base = {
        "method": "powersgd",
        "num-rounds": 4,
        "num-partitions": 4,
        "local-epochs": 1,
        "device": "cpu",
        "seed": 0,
        "output-dir": str(tmp_path / "outputs"),
    }

    # Execute
    _, up = run_reference(ExperimentConfig.from_run_config(base), base_dir=tmp_path)
    _, both = run_reference(
        ExperimentConfig.from_run_config({**base, "downlink": "compressed", "run-name": "both"}),
        base_dir=tmp_path,
    )

    # Assert: far above chance (0.1), and the compressed downlink is far below dense
    assert up["final_accuracy"] > 0.5, up
    assert both["final_accuracy"] > 0.5, both
    assert both["total_downlink_bytes"] < up["total_downlink_bytes"] / 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compression_matches_the_cpu() -> None:
    # Prepare
    target = torch.randn(num_params(Net()), generator=torch.Generator().manual_seed(5))

    # Execute: the same seeded Q0 on both devices; the receiver decompresses on the CPU
    cpu = encode(comp(4).compress(target, Net(), META, Budget())[0])
    gpu = comp(4).compress(target.cuda(), Net().cuda(), META, Budget())[0]

    # Assert
    a = comp(4).decompress(decode(cpu), Net())
    b = comp(4).decompress(decode(encode(gpu)), Net())
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
