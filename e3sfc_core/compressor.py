"""The compressor contract shared by 3SFC and every baseline, and the method registry.

A compressor turns a target vector into a :class:`~e3sfc_core.payload.Payload` and back.
It never touches error feedback or bytes: ``rounds.compress_update`` composes
compress -> encode -> decode -> decompress so that the residual always subtracts exactly
what the receiver will reconstruct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import nn

from .errors import ConfigError, PayloadRejected
from .payload import Codec, Direction, Payload
from .tensors import num_params

BodyT = TypeVar("BodyT")


@dataclass(frozen=True)
class Budget:
    """Per-payload size knob chosen by the budget scheduler.

    ``n_samples`` is the number of synthetic samples (3SFC); baselines have a fixed size
    set by their own configuration and ignore it.
    """

    n_samples: int = 1


@dataclass(frozen=True)
class PayloadMeta:
    """Header fields both sides agree on before compressing."""

    direction: Direction
    server_round: int
    base_digest: bytes


@dataclass(frozen=True)
class CompressStats:
    """Local diagnostics of one compression (never sent)."""

    seconds: float
    evaluations: int = 0
    degenerate: bool = False  # 3SFC: the scale was NaN/Inf and a zero update was sent


class Compressor(Protocol):
    """What the round logic needs from a compression method."""

    name: str
    codec: Codec
    uses_error_feedback: bool

    def compress(
        self, target: torch.Tensor, model: nn.Module, meta: PayloadMeta, budget: Budget
    ) -> tuple[Payload, CompressStats]:
        """Compress the flat ``target`` vector (model is at the shared base weights)."""
        ...

    def decompress(self, payload: Payload, model: nn.Module) -> torch.Tensor:
        """Reconstruct the flat update from a decoded payload at the base weights."""
        ...

    def encoded_size(self, numel: int, budget: Budget) -> int:
        """Most bytes ``len(encode(payload))`` of what ``compress`` produces can take:
        exact for fixed-size codecs (dense, synthetic, sign), an upper bound for the
        variable-length codes of Top-k, STC and QSGD (see ``baselines``)."""
        ...


@dataclass(frozen=True)
class CompressorSettings:
    """Knobs of every method in one place; each compressor reads the ones it needs.

    Tuning notes: ``topk_ratio`` is the kept fraction for Top-k and STC (0.01 keeps 1%);
    ``qsgd_levels`` is QSGD's ``s`` (more levels, less variance, more bits per weight)
    and ``qsgd_bucket_size`` the entries sharing one norm (512 in the paper; smaller
    buckets, less variance, one more float32 per bucket); ``float16`` halves float bodies
    at a small precision cost that error feedback absorbs; ``max_evals`` caps the closure
    evaluations of one 3SFC search (each a double backward: they are the whole cost),
    which stops early when the best |cos| improves by less than ``min_improvement`` over
    ``stall_window`` evaluations; ``init_scale`` is the std of the synthetic inputs'
    starting values (the datasets are normalised to unit std; small starts converge faster).
    ``scale_mode`` is 3SFC's scaling: ``"global"`` (the paper: one least-squares scale) or
    ``"layer"`` (one per parameter tensor; ``layer_count``, the model's number of
    parameter tensors, sizes those payloads). ``powersgd_rank`` is PowerSGD's rank ``r``;
    ``model`` (a ``models.MODELS`` key, "" if unknown) lets PowerSGD size its payloads,
    which depend on the parameter shapes. ``correction_share`` (0 for the paper's 3SFC)
    is the share of a 3SFC payload's bytes given to a sparse correction of what the
    synthetic batch misses (``corrected``), and ``batch_min_cosine`` the cosine with the
    target below which a corrected payload leaves its batch out; ``payload_ratio`` (> 0)
    grows a corrected payload's correction until the payload is at least the dense
    float32 update's bytes divided by it; ``correction_code`` is how the correction's
    values travel: ``"ternary"`` (STC's one magnitude and a sign each, about 3x the
    entries in the same bytes), ``"float"`` (each value in the payload's float width) or
    ``"auto"`` (per payload, whichever leaves the smaller residual).
    """

    topk_ratio: float = 0.01
    qsgd_levels: int = 16
    qsgd_bucket_size: int = 512
    float16: bool = False
    max_evals: int = 20
    stall_window: int = 5
    min_improvement: float = 1e-3
    init_scale: float = 0.25
    seed: int = 0
    scale_mode: str = "global"
    layer_count: int = 0
    powersgd_rank: int = 4
    model: str = ""
    correction_share: float = 0.0
    batch_min_cosine: float = 0.0
    payload_ratio: float = 0.0
    correction_code: str = "auto"


def checked_body(payload: Payload, codec: Codec, body_type: type[BodyT], model: nn.Module) -> BodyT:
    """``payload``'s body if it is ``codec``'s and sized for ``model`` (what every
    ``decompress`` checks first); otherwise :class:`PayloadRejected` naming what is wrong."""
    body = payload.body
    if payload.codec != codec or not isinstance(body, body_type):
        raise PayloadRejected(f"expected a {codec.name} payload, got {payload.codec.name}")
    if payload.numel != num_params(model):
        raise PayloadRejected(f"payload numel {payload.numel} != model weights {num_params(model)}")
    return body


CompressorFactory = Callable[[CompressorSettings, tuple[int, ...], int], Compressor]
COMPRESSORS: dict[str, CompressorFactory] = {}


def register(name: str) -> Callable[[CompressorFactory], CompressorFactory]:
    """Add a factory ``(settings, input_shape, n_classes) -> Compressor`` to the registry."""

    def deco(factory: CompressorFactory) -> CompressorFactory:
        COMPRESSORS[name] = factory
        return factory

    return deco


class ShapeSpec(Protocol):
    """What a compressor needs to know about the data (``datasets.DatasetSpec`` fits)."""

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def n_classes(self) -> int: ...


def build_compressor(name: str, settings: CompressorSettings, spec: ShapeSpec) -> Compressor:
    """Instantiate a registered method for a dataset spec (``input_shape``, ``n_classes``).

    Importing the package registers every method; an unknown name is a configuration error.
    """
    if name not in COMPRESSORS:
        raise ConfigError(f"unknown method {name!r}; known: {sorted(COMPRESSORS)}")
    shape = tuple(spec.input_shape)
    return COMPRESSORS[name](settings, shape, int(spec.n_classes))
