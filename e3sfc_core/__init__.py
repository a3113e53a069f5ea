"""E-3SFC: federated-learning update compression by synthetic features (framework-free).

Importing the package registers every compression method in
:data:`e3sfc_core.compressor.COMPRESSORS`.
"""

from . import baselines, powersgd, synthetic  # noqa: F401  (registration side effects)
from .compressor import COMPRESSORS, Budget, CompressorSettings, PayloadMeta, build_compressor
from .errors import (
    BaseModelMismatch,
    BudgetExhausted,
    ConfigError,
    DesyncError,
    E3SFCError,
    PayloadError,
    PayloadRejected,
    UnsupportedVersion,
)
from .payload import Codec, Direction, Payload, decode, encode
from .rounds import compress_update

__all__ = [
    "COMPRESSORS",
    "BaseModelMismatch",
    "Budget",
    "BudgetExhausted",
    "Codec",
    "CompressorSettings",
    "ConfigError",
    "DesyncError",
    "Direction",
    "E3SFCError",
    "Payload",
    "PayloadError",
    "PayloadMeta",
    "PayloadRejected",
    "UnsupportedVersion",
    "build_compressor",
    "compress_update",
    "decode",
    "encode",
]
