"""Plain-Python federated loop (no Flower): N clients, R rounds, any method.

It drives the same :class:`~e3sfc_core.experiment.Experiment` and
:func:`~e3sfc_core.client.client_round` the Flower apps use, so tests and benchmarks
measure exactly the algorithm that ``flwr run`` runs. Clients run one after another in
this process; their state is kept in a dict, as a SuperNode keeps ``context.state``. A
client is known by its partition id here and in the Flower apps (which map Flower's node
IDs to partitions), so both sample the same clients with the same seed.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .client import ClientState, client_data, client_round, load_client_state, save_client_state
from .config import ExperimentConfig
from .experiment import Experiment, resolve_path
from .protocol import Instruction, Reply

ReplyHook = Callable[[int, Instruction, Reply], Reply]


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
    base = base_dir or Path.cwd()
    root = resolve_path(cfg.data_root, base)

    def state_file(pid: int) -> Path | None:
        return state_dir / f"client-{pid}.npz" if state_dir is not None else None

    states = {
        pid: load_client_state(f) if (f := state_file(pid)) is not None else ClientState()
        for pid in range(cfg.num_partitions)
    }
    for server_round in exp.rounds:
        plan = exp.plan(server_round, list(states))
        if plan is None:
            break
        replies = []
        for node, instruction in plan.items():
            data = client_data(cfg, node, cfg.num_partitions, root)
            reply, new_state = client_round(
                cfg,
                exp.spec,
                instruction,
                data,
                states[node],
                node_id=node,
                partition_id=node,
                device=exp.device,
            )
            if reply_hook is not None:
                reply = reply_hook(server_round, instruction, reply)
            if reply.status != "error":  # a crashed client keeps its old state
                states[node] = new_state
                if (f := state_file(node)) is not None:
                    save_client_state(f, new_state)
            replies.append(reply)
        exp.complete(server_round, replies)
        if stop_after is not None and server_round >= stop_after:
            return exp, {}
    return exp, exp.finalize()


def main(argv: list[str] | None = None) -> None:
    """``python -m e3sfc_core.simulate key=value ...``: run without Flower."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*", help="kebab-case key=value pairs, e.g. method=topk")
    parser.add_argument("--state-dir", type=Path, help="keep client states on disk (exact resume)")
    args = parser.parse_args(argv)
    raw: dict[str, Any] = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        raw[key] = _parse_scalar(value)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, summary = run_reference(ExperimentConfig.from_run_config(raw), state_dir=args.state_dir)
    print(f"final accuracy {summary.get('final_accuracy')}, total bytes {summary.get('total_bytes')}")


def _parse_scalar(text: str) -> Any:
    """Parse a command-line value like TOML would (bools, ints, floats, else string)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip("'\"")


if __name__ == "__main__":
    main()
