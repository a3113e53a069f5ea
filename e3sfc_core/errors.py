"""The project's own exception family, so callers can catch exactly what we raise."""

from __future__ import annotations


class E3SFCError(Exception):
    """Base class of every error raised on purpose by e3sfc_core."""


class ConfigError(E3SFCError, ValueError):
    """A configuration key is unknown or its value is out of range."""


class PayloadError(E3SFCError, ValueError):
    """Bytes that arrived are not a valid payload (the message says what is wrong)."""


class UnsupportedVersion(PayloadError):
    """The payload was written by a format version this build cannot read."""


class BaseModelMismatch(PayloadError):
    """The payload was made relative to weights other than the ones we hold."""


class PayloadRejected(PayloadError):
    """A well-formed payload that breaks this round's rules (budget, shape, method)."""


class DesyncError(E3SFCError):
    """A client's copy of the global model cannot be brought to the server's digest."""


class BudgetExhausted(E3SFCError):
    """The run's communication budget cannot pay for another round."""


class DatasetError(E3SFCError):
    """A dataset is unknown, missing on disk or malformed."""
