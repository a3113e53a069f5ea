"""Client round: error feedback across skipped rounds and client state round trips."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from e3sfc_core.client import ClientState, client_round
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.datasets import get_spec, load_partition
from e3sfc_core.errors import PayloadError
from e3sfc_core.protocol import Instruction
from e3sfc_core.server import FederatedServer
from e3sfc_core.training import resolve_device


def _round(
    accepted_round: int, state: ClientState, method: str = "topk", applied_scale: float = 1.0
) -> ClientState:
    cfg = ExperimentConfig.from_run_config({"method": method, "local-epochs": 1, "device": "cpu"})
    spec, device = get_spec("digits"), resolve_device("cpu")
    server = FederatedServer(cfg, spec, device)
    instr = server.plan_round(2, [0])[0]
    instr = replace(instr, accepted_round=accepted_round, applied_scale=applied_scale)
    data = load_partition("digits", 0, 4, alpha=1.0, seed=0, data_root="data")
    _, new = client_round(cfg, spec, instr, data, state, node_id=0, partition_id=0, device=device)
    return new


def test_unapplied_update_returns_to_the_residual_exactly_once() -> None:
    # Prepare: the client sent `pending` in round 1
    torch.manual_seed(0)
    numel = 55_210
    pending = torch.randn(numel) * 1e-3
    residual = torch.randn(numel) * 1e-3
    state = ClientState(None, residual, pending, pending_round=1)
    # Execute: the server says round 1 was applied (1) or not (-1)
    applied = _round(1, state)
    lost = _round(-1, state)
    # Assert: residual + transmitted is the client's whole target; the lost round adds
    # exactly `pending` to it, and only when it was not applied
    assert applied.residual is not None and applied.pending is not None
    assert lost.residual is not None and lost.pending is not None
    diff = (lost.residual + lost.pending) - (applied.residual + applied.pending)
    torch.testing.assert_close(diff, pending, atol=1e-6, rtol=1e-5)


def test_what_clipping_held_back_returns_to_the_residual() -> None:
    # Prepare: the client sent `pending` in round 1; the server applied it clipped to 40%
    torch.manual_seed(0)
    numel = 55_210
    pending = torch.randn(numel) * 1e-3
    state = ClientState(None, torch.randn(numel) * 1e-3, pending, pending_round=1)
    # Execute
    whole = _round(1, state)
    clipped = _round(1, state, applied_scale=0.4)
    # Assert: the clipped round's target holds the 60% of `pending` that was not applied
    assert whole.residual is not None and whole.pending is not None
    assert clipped.residual is not None and clipped.pending is not None
    diff = (clipped.residual + clipped.pending) - (whole.residual + whole.pending)
    torch.testing.assert_close(diff, 0.6 * pending, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_an_applied_scale_outside_0_1_is_refused(bad: float) -> None:
    # Prepare
    good = Instruction(1, 2, bytes(8), 100, 0, applied_scale=0.5)

    # Execute / Assert
    assert Instruction.decode(good.encode()).applied_scale == 0.5
    with pytest.raises(PayloadError, match="applied_scale"):
        Instruction.decode(replace(good, applied_scale=bad).encode())


def test_client_state_round_trip_and_size_check() -> None:
    state = ClientState(torch.arange(4.0), torch.ones(4), None, 3)
    back = ClientState.from_tensors({k: v.numpy() for k, v in state.to_tensors().items()})
    assert back.pending_round == 3 and back.pending is None
    torch.testing.assert_close(back.weights, state.weights)
    assert back.fitted(5).weights is None and back.fitted(4).residual is not None


def test_a_client_keeps_only_the_state_its_method_needs() -> None:
    # Execute: one round of a method with error feedback and two without
    kept = {m: _round(-1, ClientState(), m) for m in ("topk", "fedavg", "qsgd")}
    # Assert: every client keeps its weights (to replay downlinks); only error feedback
    # needs the residual and the round's update (four model-size vectors instead of one)
    for method, state in kept.items():
        tensors = set(state.to_tensors()) - {"pending-round"}
        expected = {"weights", "residual", "pending", "previous"} if method == "topk" else {"weights"}
        assert tensors == expected, method
