"""The 3SFC decompressor: the model's own gradient on a synthetic batch.

Server and clients call this one function, so a payload decodes to the same update on
both sides (given bit-identical weights, which the base digest guarantees).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def synthetic_gradient(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    create_graph: bool = False,
    params: list[nn.Parameter] | None = None,
) -> torch.Tensor:
    """Flat gradient of ``CE(model(inputs), labels)`` w.r.t. the weights.

    ``labels`` are soft targets used as they are (no softmax), as in the paper. With
    ``create_graph=True`` the result stays differentiable w.r.t. inputs and labels, which
    is what the compressor optimises (a double backward). ``params`` is
    ``list(model.parameters())``, passed by callers that evaluate this many times.
    """
    if params is None:
        params = list(model.parameters())
    loss = F.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([g.reshape(-1) for g in grads])


def parameter_sizes(model: nn.Module) -> list[int]:
    """Sizes of the model's parameter tensors in flat-vector order (one per layer scale)."""
    return [p.numel() for p in model.parameters()]


def apply_layer_scales(g: torch.Tensor, layer_scales: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``g`` with each parameter tensor's block multiplied by its own scale."""
    factors = torch.repeat_interleave(
        layer_scales.to(g.device, g.dtype), torch.tensor(sizes, device=g.device)
    )
    return g * factors


def synthesize_update(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    layer_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decompress: ``scale * synthetic_gradient`` at the model's current weights, each
    parameter tensor's block also multiplied by its ``layer_scales`` entry when given."""
    was_training = model.training
    model.eval()  # no train-time randomness: the receiver must get the same numbers
    try:
        device = next(model.parameters()).device
        with torch.enable_grad():
            g = synthetic_gradient(model, inputs.to(device), labels.to(device))
        if layer_scales is not None:
            g = apply_layer_scales(g, layer_scales, parameter_sizes(model))
        return (g * scale).detach()
    finally:
        model.train(was_training)
