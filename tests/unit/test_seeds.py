"""One seed derivation (e3sfc_core.seeds.derive_seed) for every random draw of a run."""

from __future__ import annotations

import hashlib
import struct

from e3sfc_core.seeds import COMPRESSOR, QSGD, SAMPLE, SHUFFLE, SYNTHETIC, derive_seed


def test_same_inputs_same_seed_in_range() -> None:
    # Execute
    a = derive_seed(7, SHUFFLE, 3, 2)
    b = derive_seed(7, SHUFFLE, 3, 2)
    # Assert
    assert a == b
    assert 0 <= a < 2**63


def test_purposes_rounds_and_clients_give_distinct_seeds() -> None:
    # Prepare: every purpose with the same ids, and the same purpose over rounds/clients
    purposes = [SAMPLE, SHUFFLE, COMPRESSOR, SYNTHETIC, QSGD]
    # Execute
    by_purpose = {derive_seed(0, p, 1, 1) for p in purposes}
    by_ids = {derive_seed(0, SHUFFLE, r, c) for r in range(20) for c in range(20)}
    by_run = {derive_seed(s, SAMPLE, 1) for s in range(100)}
    # Assert: no collisions (the old linear formulas collided, e.g. seed*1_000_003+round)
    assert len(by_purpose) == len(purposes)
    assert len(by_ids) == 400
    assert len(by_run) == 100


def test_derivation_is_sha256_of_purpose_and_little_endian_ids() -> None:
    # Prepare: the documented recipe, written out independently
    data = b"e3sfc.qsgd" + struct.pack("<qqq", 5, 3, 1)
    expected = int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & (2**63 - 1)
    # Execute / Assert
    assert derive_seed(5, QSGD, 3, 1) == expected
