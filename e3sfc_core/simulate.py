"""Plain-Python federated run (no Flower): N clients, R rounds, any method.

It runs the same round loop (:meth:`~e3sfc_core.experiment.Experiment.run`) and
:func:`~e3sfc_core.client.client_round` as the Flower apps, over an in-process transport,
so tests and benchmarks measure exactly the algorithm that ``flwr run`` runs. Clients run
one after another in this process; their state is kept in a dict, as a SuperNode keeps
``context.state``. A
client is known by its partition id here and in the Flower apps (which map Flower's node
IDs to partitions), so both sample the same clients with the same seed.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .client import (
    ClientState,
    client_data,
    client_round,
    client_state_file,
    load_client_state,
    save_client_state,
)
from .config import ExperimentConfig, parse_pairs
from .datasets import DatasetSpec
from .experiment import Experiment, resolve_path
from .protocol import STATUS_ERROR, Instruction, Reply
from .transport import Roll

ReplyHook = Callable[[int, Instruction, Reply], Reply]


class InProcessTransport:
    """Every partition is a client in this process, always present; clients run one
    after another and keep their state in a dict (and in ``state_dir`` if given)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        spec: DatasetSpec,
        data_root: Path,
        device: torch.device,
        *,
        reply_hook: ReplyHook | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.cfg, self.spec, self.data_root, self.device = cfg, spec, data_root, device
        self.reply_hook = reply_hook
        self.state_dir = state_dir
        self.states = {pid: self._load(pid) for pid in range(cfg.num_partitions)}

    def _load(self, pid: int) -> ClientState:
        if self.state_dir is None:
            return ClientState()
        return load_client_state(client_state_file(self.state_dir, pid))

    def roll(self, server_round: int) -> Roll:
        """All partitions, every round."""
        return Roll(clients=list(self.states))

    def exchange(self, server_round: int, plan: Mapping[int, Instruction]) -> list[Reply]:
        """Run each planned client's round; a crashed client keeps its old state. Messages
        are encoded and decoded as on the network, so clients and server see what they
        would see through Flower (float32 fields included)."""
        replies = []
        for pid, sent in plan.items():
            instruction = Instruction.decode(sent.encode())
            data = client_data(self.cfg, pid, self.cfg.num_partitions, self.data_root)
            reply, new_state = client_round(
                self.cfg,
                self.spec,
                instruction,
                data,
                self.states[pid],
                node_id=pid,
                partition_id=pid,
                device=self.device,
            )
            if self.reply_hook is not None:
                reply = self.reply_hook(server_round, instruction, reply)
            if reply.status != STATUS_ERROR:
                reply = Reply.decode(pid, reply.encode())
                self.states[pid] = new_state
                if self.state_dir is not None:
                    save_client_state(client_state_file(self.state_dir, pid), new_state)
            replies.append(reply)
        return replies


def run_reference(
    cfg: ExperimentConfig,
    base_dir: Path | None = None,
    *,
    reply_hook: ReplyHook | None = None,
    stop_after: int | None = None,
    state_dir: Path | None = None,
) -> tuple[Experiment, dict[str, Any]]:
    """Run ``cfg`` with ``cfg.num_partitions`` in-process clients.

    ``reply_hook`` may replace a reply before the server sees it (fault injection in
    tests); ``stop_after`` ends the loop after that round without finalising, as a
    crash would; ``state_dir`` keeps client states on disk (as a SuperNode with a
    ``state-dir`` does), so a killed process resumes exactly.
    """
    exp = Experiment(cfg, base_dir)
    root = resolve_path(cfg.data_root, base_dir or Path.cwd())
    transport = InProcessTransport(
        cfg, exp.spec, root, exp.device, reply_hook=reply_hook, state_dir=state_dir
    )
    if not exp.run(transport, stop_after=stop_after):
        return exp, {}
    return exp, exp.finalize()


def main(argv: list[str] | None = None) -> None:
    """``python -m e3sfc_core.simulate key=value ...``: run without Flower."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*", help="kebab-case key=value pairs, e.g. method=topk")
    parser.add_argument("--state-dir", type=Path, help="keep client states on disk (exact resume)")
    args = parser.parse_args(argv)
    raw = parse_pairs(args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, summary = run_reference(ExperimentConfig.from_run_config(raw), state_dir=args.state_dir)
    print(f"final accuracy {summary.get('final_accuracy')}, total bytes {summary.get('total_bytes')}")


if __name__ == "__main__":
    main()
