"""Every random seed of a run, derived in one place.

A seed is ``derive_seed(run_seed, purpose, *ids)``: SHA-256 of the purpose and the
integers, cut to 63 bits. Hashing (rather than ``a * seed + b * round + c``) keeps the
streams of different purposes, rounds and clients apart for any run seed, and every
process (server, SuperNodes, the in-process loop, the benchmarks) computes the same
numbers without talking to the others.

The purposes and the ids each one takes, in order:

============  ================================  =====================================
purpose       ids                               seeds
============  ================================  =====================================
SAMPLE        server round                      which clients train (server)
SHUFFLE       server round, partition id        a client's mini-batch order
COMPRESSOR    partition id                      a client's compressor (below)
SYNTHETIC     server round, direction           3SFC's initial synthetic data
QSGD          server round, direction           QSGD's stochastic rounding
POWERSGD      server round, direction, tensor   PowerSGD's starting matrix Q0
============  ================================  =====================================

``SYNTHETIC``, ``QSGD`` and ``POWERSGD`` start from the compressor's own seed (the run seed on the
server, the ``COMPRESSOR`` seed on a client), so clients draw independent noise. The
model's initial weights and the data partition use the run seed itself.
"""

from __future__ import annotations

import hashlib
import struct

SAMPLE = "sample"
SHUFFLE = "shuffle"
COMPRESSOR = "compressor"
SYNTHETIC = "synthetic"
QSGD = "qsgd"
POWERSGD = "powersgd"

_MASK = 2**63 - 1


def derive_seed(run_seed: int, purpose: str, *ids: int) -> int:
    """A 63-bit seed for ``purpose`` and ``ids`` under ``run_seed``.

    Parameters
    ----------
    run_seed
        The run's seed (or a compressor's seed, itself derived from it).
    purpose
        One of the names above; different purposes give unrelated seeds.
    ids
        The integers that tell the draws of one purpose apart (round, client, ...).

    Returns
    -------
    int
        In ``[0, 2**63)``: valid for ``random.Random`` and ``torch.Generator``.
    """
    data = b"e3sfc." + purpose.encode() + struct.pack(f"<{1 + len(ids)}q", int(run_seed), *map(int, ids))
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & _MASK
