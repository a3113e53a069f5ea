"""Measurement helpers shared by the benchmark scripts (not a benchmark itself; the
report side lives in :mod:`bench.report`).

* :func:`collect_targets` produces *real* compression targets: the local updates of
  clients along a FedAvg trajectory run by the core's own loop (``run_reference``), with
  the local-training seconds of each update.
* :func:`run_federated` runs one configuration through the core's in-process loop.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.report import REPO, RESULTS, mean_std, median

# --------------------------------------------------------------------------- helpers


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` unless 0. The benchmarks default to 1: on a
    shared 2-core machine torch's default (one thread per core) was up to 100x slower
    for these small models whenever other jobs were running (see bench/README.md)."""
    if threads > 0:
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# ------------------------------------------------------------------ compression


def client_settings(cfg: Any, partition_id: int, **overrides: Any) -> Any:
    """``cfg``'s compressor settings with client ``partition_id``'s seed
    (``e3sfc_core.client.client_settings``), then ``overrides`` applied."""
    from dataclasses import replace

    from e3sfc_core.client import client_settings as core_client_settings

    return replace(core_client_settings(cfg, partition_id), **overrides)


def uplink_meta(target: Any) -> Any:
    """The uplink ``PayloadMeta`` of a target (anything with ``server_round`` and ``base``)."""
    from e3sfc_core.compressor import PayloadMeta
    from e3sfc_core.payload import Direction
    from e3sfc_core.tensors import digest_flat

    return PayloadMeta(Direction.UPLINK, target.server_round, digest_flat(target.base))


def timed_roundtrip(
    comp: Any,
    target: torch.Tensor,
    model: torch.nn.Module,
    meta: Any,
    n: int,
    device: torch.device,
    around: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, Any]:
    """compress -> encode -> decode -> decompress, as ``rounds.compress_update``, each step
    timed with :class:`Timer`. ``around()`` is a context manager entered around the
    compress and the decompress timers (e.g. a peak-memory probe); those two are returned
    as ``compress_ctx``/``decompress_ctx`` next to the payload ``blob``, the compressor's
    ``stats``, the decompressed ``transmitted`` update and the ``Timer`` of every step
    (``total``, ``compress``, ``encode``, ``decode``, ``decompress``)."""
    from e3sfc_core.compressor import Budget
    from e3sfc_core.payload import decode, encode

    with Timer(device) as t_total:
        with around() as ctx_c, Timer(device) as t_c:
            payload, stats = comp.compress(target, model, meta, Budget(n))
        with Timer(device) as t_e:
            blob = encode(payload)
        with Timer(device) as t_d:
            decoded = decode(blob)
        with around() as ctx_x, Timer(device) as t_x:
            transmitted = comp.decompress(decoded, model).to(target.device)
    return {
        "blob": blob,
        "stats": stats,
        "transmitted": transmitted,
        "total": t_total,
        "compress": t_c,
        "encode": t_e,
        "decode": t_d,
        "decompress": t_x,
        "compress_ctx": ctx_c,
        "decompress_ctx": ctx_x,
    }


# --------------------------------------------------------------------- real targets


def client_data(cfg: Any, partition_id: int, root: Path) -> Any:
    """Training data of client ``partition_id`` under ``cfg``, as ``run_reference`` loads it
    (``root`` is the resolved data root)."""
    from e3sfc_core.client import client_data as core_client_data

    return core_client_data(cfg, partition_id, cfg.num_partitions, root)


@dataclass
class Target:
    """One client's real local update at one round of a FedAvg trajectory."""

    server_round: int
    partition_id: int
    base: torch.Tensor  # global weights the update is relative to (flat, CPU)
    update: torch.Tensor  # W_local - W (flat, CPU)
    train_seconds: float
    num_examples: int


def collect_targets(
    cfg: Any,
    rounds: Sequence[int],
    clients: Sequence[int],
    device: torch.device,
    base_dir: Path = REPO,
) -> tuple[list[Target], list[dict[str, float]]]:
    """Run ``cfg`` as FedAvg with every partition training through the core's own loop
    (``run_reference``) for ``max(rounds)`` rounds, and keep the local updates of
    ``clients`` in ``rounds``: each reply's payload decompressed, relative to the global
    weights the client started from (rebuilt from the instructions' downlink by
    ``rounds.apply_downlink``, which checks them against the instruction's digest).

    Returns the targets and a per-round log (global test accuracy after the round).
    """
    from e3sfc_core.compressor import build_compressor
    from e3sfc_core.datasets import get_spec
    from e3sfc_core.models import build_model
    from e3sfc_core.payload import decode
    from e3sfc_core.rounds import apply_downlink
    from e3sfc_core.simulate import run_reference
    from e3sfc_core.tensors import get_flat

    keep_rounds, keep_clients = set(rounds), set(clients)
    targets: list[Target] = []
    with tempfile.TemporaryDirectory() as tmp:
        fields = {"method": "fedavg", "fraction_train": 1.0, "num_rounds": max(rounds), "device": str(device)}
        run = cfg.model_copy(update={**fields, "output_dir": str(Path(tmp) / "out")})
        spec = get_spec(run.dataset)
        model = build_model(run.model, tuple(spec.input_shape), spec.n_classes, run.seed)
        comp = build_compressor(run.compressor_name, run.compressor_settings(), spec)
        at_round = [0]

        def keep(server_round: int, instruction: Any, reply: Any) -> Any:
            if at_round[0] != server_round:  # the round's global weights, as every client rebuilds them
                apply_downlink(model, instruction.downlink, comp, instruction.target_digest)
                at_round[0] = server_round
            if server_round in keep_rounds and reply.partition_id in keep_clients:
                pid, seconds = reply.partition_id, float(reply.metrics["train-seconds"])
                update = comp.decompress(decode(reply.payload), model).cpu().clone()
                base = get_flat(model).cpu().clone()
                targets.append(Target(server_round, pid, base, update, seconds, reply.num_examples))
            return reply

        exp, _ = run_reference(run, base_dir, reply_hook=keep, stop_after=run.num_rounds)
    targets.sort(key=lambda t: (t.server_round, t.partition_id))
    return targets, [{"round": r.round, "accuracy": r.accuracy} for r in exp.server.records]


def train_as_client(
    model: torch.nn.Module, data: Any, cfg: Any, server_round: int, partition_id: int, device: torch.device
) -> Any:
    """Local training exactly as ``client_round`` does it: ``cfg``'s epochs, learning rate
    and batch size, and its shuffling seed for this round and partition."""
    from e3sfc_core.seeds import SHUFFLE, derive_seed
    from e3sfc_core.training import train_local

    seed = derive_seed(cfg.seed, SHUFFLE, server_round, partition_id)
    return train_local(
        model, data, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, device=device, seed=seed
    )


def retime_training(cfg: Any, target: Target, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of re-running ``target``'s local training (same data, weights and
    seed), so that a compression/training ratio compares timings taken side by side on a
    machine whose load changes."""
    from e3sfc_core.datasets import get_spec
    from e3sfc_core.experiment import resolve_path
    from e3sfc_core.models import build_model
    from e3sfc_core.tensors import set_flat

    data = client_data(cfg, target.partition_id, resolve_path(cfg.data_root, REPO))
    spec = get_spec(cfg.dataset)
    model = build_model(cfg.model, tuple(spec.input_shape), spec.n_classes, cfg.seed).to(device)
    times = []
    for _ in range(repeats):
        set_flat(model, target.base.to(device))
        with Timer(device) as t:
            train_as_client(model, data, cfg, target.server_round, target.partition_id, device)
        times.append(t.seconds)
    return median(times)


class Timer:
    """``with Timer(device) as t: ...; t.seconds`` (synchronises CUDA on both ends)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t


# ----------------------------------------------------------------- federated runs


def add_setting_args(p: argparse.ArgumentParser, *, federated: bool = True) -> None:
    """The data/model/partition options of the scripts (digits/MLP, 10 clients, 5 local
    epochs); ``federated`` adds ``--num-rounds``, ``--dirichlet-alpha`` and ``--seeds``."""
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--data-root", default="data")
    if federated:
        p.add_argument("--num-rounds", type=int, default=30)
    p.add_argument("--num-partitions", type=int, default=10)
    if federated:
        p.add_argument("--dirichlet-alpha", type=float, default=1.0)
    p.add_argument("--local-epochs", type=int, default=5)
    if federated:
        p.add_argument("--seeds", default="0,1,2")


def fedavg_targets_config(args: argparse.Namespace, device: str) -> Any:
    """The FedAvg run whose client updates a compressor benchmark takes as targets, from
    the setting flags of :func:`add_setting_args` (``federated=False``) plus ``--seed``."""
    from e3sfc_core.config import ExperimentConfig

    return ExperimentConfig.from_run_config(
        {
            "method": "fedavg",
            "dataset": args.dataset,
            "model": args.model,
            "data-root": args.data_root,
            "num-partitions": args.num_partitions,
            "local-epochs": args.local_epochs,
            "seed": args.seed,
            "device": device,
        }
    )


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--set``, ``--device``, ``--threads`` and ``--out-name`` of the federated scripts."""
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out-name", default="")


def results_name(stem: str, args: argparse.Namespace) -> str:
    """Where a federated script's results go: ``--out-name``, else ``stem`` for digits/MLP
    and ``<stem>_<dataset>_<model>`` otherwise."""
    if args.out_name:
        return str(args.out_name)
    return stem if (args.dataset, args.model) == ("digits", "mlp") else f"{stem}_{args.dataset}_{args.model}"


def federated_setup(args: argparse.Namespace, script: str) -> tuple[str, dict[str, Any]]:
    """Exit with status 2 unless ``args.dataset`` loads; return the out-name (``--out-name``,
    else ``script`` for digits/MLP and ``<script>_<dataset>_<model>`` otherwise) and the
    kebab-case config every run shares (``--set`` included; per-run outputs go to
    ``bench/results/runs/<out-name>/``)."""
    missing = dataset_available(args.dataset, args.data_root)
    if missing:
        print(f"cannot run {args.dataset}: {missing}", file=sys.stderr)
        raise SystemExit(2)
    out_name = results_name(script, args)
    common = {
        "dataset": args.dataset,
        "model": args.model,
        "data-root": args.data_root,
        "num-rounds": args.num_rounds,
        "num-partitions": args.num_partitions,
        "dirichlet-alpha": args.dirichlet_alpha,
        "local-epochs": args.local_epochs,
        "device": args.device,
        "output-dir": str(RESULTS / "runs" / out_name),
        **parse_overrides(args.set),
    }
    return out_name, common


def mean_uplink_cosine(runs: Sequence[dict[str, Any]]) -> float:
    """Mean over runs (of :func:`run_federated`) of each run's mean uplink |cosine| over
    its rounds; runs without a round are left out (NaN if none has one)."""
    per_run = [sum(r["mean_cosine"] for r in x["records"]) / len(x["records"]) for x in runs if x["records"]]
    return mean_std(per_run)[0]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=0.1", "iid=true"]`` -> kebab-case dict, values parsed as the CLI does."""
    from e3sfc_core.config import parse_pairs
    from e3sfc_core.errors import ConfigError

    try:
        return parse_pairs(items)
    except ConfigError as exc:
        raise SystemExit(f"override: {exc}") from None


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"3sfc@synthetic-samples=1@float16=true"`` -> (label, {"method": "3sfc", ...})."""
    parts = spec.split("@")
    raw = {"method": parts[0].strip()}
    raw.update(parse_overrides(parts[1:]))
    return spec, raw


def run_federated(raw: dict[str, Any], base_dir: Path = REPO, *, finalize: bool = True) -> dict[str, Any]:
    """One ``run_reference`` run of the kebab-case config ``raw``.

    Returns ``{"summary", "records", "wall_seconds", "client_metrics"}``; the run also
    writes its own ``metrics.csv``/``summary.json`` under ``output-dir/run-name``.
    ``client_metrics`` has one dict per client reply (round, node, the reply metrics).
    ``finalize=False`` stops after the last round without writing summary.json and the
    plot (``summary`` is then ``{}``; for timing the rounds alone).
    """
    from dataclasses import asdict

    from e3sfc_core.config import ExperimentConfig
    from e3sfc_core.simulate import run_reference

    cfg = ExperimentConfig.from_run_config(raw)
    client_metrics: list[dict[str, Any]] = []

    def hook(server_round: int, instruction: Any, reply: Any) -> Any:
        client_metrics.append(
            {
                "round": server_round,
                "node": reply.node_id,
                "bytes": len(reply.payload),
                **{k: float(v) for k, v in reply.metrics.items()},
            }
        )
        return reply

    start = time.perf_counter()
    exp, summary = run_reference(
        cfg, base_dir, reply_hook=hook, stop_after=None if finalize else cfg.num_rounds
    )
    wall = time.perf_counter() - start
    return {
        "summary": summary,
        "records": [asdict(r) for r in exp.server.records],
        "wall_seconds": wall,
        "client_metrics": client_metrics,
    }


def dataset_available(dataset: str, data_root: str, base_dir: Path = REPO) -> str | None:
    """``None`` if ``dataset`` loads from ``data_root``, else the loader's message."""
    from e3sfc_core.datasets import load_dataset
    from e3sfc_core.errors import DatasetError
    from e3sfc_core.experiment import resolve_path

    try:
        load_dataset(dataset, resolve_path(data_root, base_dir), False)
    except DatasetError as exc:
        return str(exc)
    return None
