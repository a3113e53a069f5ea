"""Flat-vector view of a model's weights, cosine similarity and the weights digest.

Every update in this project is one flat float32 vector over the model's parameters in
``named_parameters`` order. Our models carry no buffers (GroupNorm, never BatchNorm), so
that vector *is* the whole model state and one digest covers it.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

DIGEST_SIZE = 8


def num_params(model: nn.Module) -> int:
    """Number of scalar weights, i.e. the length of every update vector."""
    return sum(p.numel() for p in model.parameters())


def get_flat(model: nn.Module) -> torch.Tensor:
    """Copy of the weights as one detached float32 vector."""
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).clone()


@torch.no_grad()
def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Overwrite the weights with ``flat`` (the inverse of :func:`get_flat`)."""
    total = num_params(model)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} values, model has {total}")
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n


@torch.no_grad()
def add_flat_(model: nn.Module, update: torch.Tensor) -> None:
    """Apply ``W <- W + update`` in place, parameter by parameter.

    Server and clients both apply updates through this one function so that the
    float32 additions are identical and so are the resulting digests.
    """
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.add_(update[offset : offset + n].view_as(p).to(p.device, p.dtype))
        offset += n


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """Cosine similarity of two vectors; 0.0 when either is (numerically) zero."""
    na, nb = float(a.norm()), float(b.norm())
    if na < eps or nb < eps:
        return 0.0
    return float(torch.dot(a.double().flatten(), b.double().flatten()) / (na * nb))


def digest_flat(flat: torch.Tensor) -> bytes:
    """8 bytes of SHA-256 over the float32 little-endian bytes of a weight vector."""
    data = flat.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
    return hashlib.sha256(data).digest()[:DIGEST_SIZE]


def weights_digest(model: nn.Module) -> bytes:
    """Digest of the model's weights: equal digests mean bit-identical models."""
    return digest_flat(get_flat(model))
