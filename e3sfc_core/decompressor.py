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


def synthesize_update(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, scale: float
) -> torch.Tensor:
    """Decompress: ``scale * synthetic_gradient`` at the model's current weights."""
    was_training = model.training
    model.eval()  # no train-time randomness: the receiver must get the same numbers
    try:
        device = next(model.parameters()).device
        with torch.enable_grad():
            g = synthetic_gradient(model, inputs.to(device), labels.to(device))
        return (g * scale).detach()
    finally:
        model.train(was_training)
