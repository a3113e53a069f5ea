"""What the round loop needs from a runtime: who can train, and one exchange per round.

:meth:`e3sfc_core.experiment.Experiment.run` is the only round loop. The Flower strategy
(``server_app.transport``) and the in-process clients (:mod:`e3sfc_core.simulate`) are
transports: they move instructions and replies and describe who is there, but decide
nothing about the run (sampling, budget, stopping and outputs stay in the core), so both
runtimes produce the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .protocol import Instruction, Reply


@dataclass(frozen=True)
class Roll:
    """The clients (partition ids) that can train in a round.

    ``rejoined`` lists partitions now served by another process than before (a restarted
    node: the server no longer knows which weights it holds). ``absent`` says, in the
    runtime's words, why nobody can train when ``clients`` is empty.
    """

    clients: Sequence[int]
    rejoined: Sequence[int] = field(default_factory=tuple)
    absent: str = ""


class Transport(Protocol):
    """A runtime that carries one experiment's rounds."""

    def roll(self, server_round: int) -> Roll:
        """Who can train in ``server_round`` (asked once per round, before planning)."""
        ...

    def exchange(self, server_round: int, plan: Mapping[int, Instruction]) -> list[Reply]:
        """Deliver each client's instruction and return the replies that came back, keyed
        by partition id (failed clients as error replies; missing ones may be absent)."""
        ...
