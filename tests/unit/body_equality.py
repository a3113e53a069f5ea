"""Field-by-field equality of decoded payload bodies, shared by the payload tests."""

from __future__ import annotations

import dataclasses
import struct

import torch


def assert_same_body(actual: object, expected: object) -> None:
    """Tensors exactly (dtype-insensitively), float fields as their float32 wire value,
    nested bodies (a corrected payload's parts) recursively."""
    assert type(actual) is type(expected)
    for name, value in vars(expected).items():
        got = getattr(actual, name)
        if dataclasses.is_dataclass(value):
            assert_same_body(got, value)
        elif isinstance(value, torch.Tensor):
            assert tuple(got.shape) == tuple(value.shape), name
            if value.dtype.is_floating_point:
                torch.testing.assert_close(got.float(), value.float(), rtol=0, atol=0)
            else:
                assert torch.equal(got.long(), value.long()), name
        elif isinstance(value, float):
            assert got == struct.unpack("<f", struct.pack("<f", value))[0], name
        else:
            assert got == value, name
