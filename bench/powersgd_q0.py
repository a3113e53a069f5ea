"""PowerSGD in federated rounds: fresh seeded Q0 vs warm start, and the rank (issue 11).

Command (digits/MLP, CPU, a few minutes on 2 cores)::

    .venv/bin/python bench/powersgd_q0.py

What it does: runs ``e3sfc_core.simulate.run_reference`` with ``method = "powersgd"``
and ``downlink = "compressed"`` (PowerSGD both ways, error feedback on both sides) for
every fraction of clients per round, rank and seed, once as shipped (``Q0`` drawn fresh
from a seed each round, :mod:`e3sfc_core.powersgd`) and once warm-started (``Q0`` = the
``Q`` this sender sent for that tensor the last time it compressed, as in the paper's
data-parallel setting; a client that was not sampled keeps an older ``Q``). FedAvg runs
alongside as the reference. Reports final accuracy (mean and std over seeds), the mean
uplink cosine and the uplink bytes per client payload.

Writes ``bench/results/powersgd_q0.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.common import parse_ints
from bench.report import Report, Table, env_info, mean_std, run_script
from e3sfc_core.compressor import COMPRESSORS, CompressorSettings, PayloadMeta
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.powersgd import PowerSGDCompressor, model_shapes
from e3sfc_core.simulate import run_reference

_LAST_Q: dict[tuple[int, int, int], torch.Tensor] = {}


class WarmPowerSGD(PowerSGDCompressor):
    """PowerSGD whose ``Q0`` is the sender's previous ``Q`` for the tensor (bench only)."""

    def initial_q(self, m: torch.Tensor, rank: int, meta: PayloadMeta, index: int) -> torch.Tensor:
        prev = _LAST_Q.get((self.settings.seed, int(meta.direction), index))
        if prev is None or tuple(prev.shape) != (m.shape[1], rank):
            return super().initial_q(m, rank, meta, index)
        return prev.to(m.device, torch.float64)

    def factors(
        self, m: torch.Tensor, rank: int, meta: PayloadMeta, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p, q = super().factors(m, rank, meta, index)
        _LAST_Q[(self.settings.seed, int(meta.direction), index)] = q.detach().cpu().clone()
        return p, q


@contextmanager
def warm_start() -> Iterator[None]:
    """Register the warm-started variant as ``powersgd`` for the duration."""
    original = COMPRESSORS["powersgd"]

    def factory(settings: CompressorSettings, input_shape: tuple[int, ...], n_classes: int) -> WarmPowerSGD:
        return WarmPowerSGD(settings, model_shapes(settings.model, input_shape, n_classes))

    _LAST_Q.clear()
    COMPRESSORS["powersgd"] = factory
    try:
        yield
    finally:
        COMPRESSORS["powersgd"] = original


def run(raw: dict[str, Any], warm: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExperimentConfig.from_run_config({**raw, "output-dir": str(Path(tmp) / "out")})
        t0 = time.perf_counter()
        if warm:
            with warm_start():
                exp, summary = run_reference(cfg, base_dir=Path(tmp))
        else:
            exp, summary = run_reference(cfg, base_dir=Path(tmp))
        records = exp.server.records
        cosines = [r.mean_cosine for r in records if r.mean_cosine == r.mean_cosine]
        return {
            "accuracy": summary["final_accuracy"],
            "uplink_bytes": summary["total_uplink_bytes"],
            "payload_bytes": exp.server.payload_size(1),
            "mean_cosine": statistics.fmean(cosines) if cosines else float("nan"),
            "seconds": time.perf_counter() - t0,
        }


def _acc(runs: list[dict[str, Any]]) -> str:
    return "{:.3f} ± {:.3f}".format(*mean_std([r["accuracy"] for r in runs]))


def _cos(runs: list[dict[str, Any]]) -> str:
    return f"{statistics.fmean(r['mean_cosine'] for r in runs):.3f}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--ranks", default="1,2,4,8")
    p.add_argument("--fractions", default="1.0,0.3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--num-partitions", type=int, default=10)
    p.add_argument("--out-name", default="powersgd_q0")
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = {
        "dataset": "digits",
        "model": "mlp",
        "num-rounds": args.rounds,
        "num-partitions": args.num_partitions,
        "local-epochs": args.local_epochs,
        "device": "cpu",
        "num-threads": 1,
        "downlink": "compressed",
    }
    runs: list[dict[str, Any]] = []
    for frac in [float(f) for f in args.fractions.split(",")]:
        common = {**base, "fraction-train": frac}
        for s in parse_ints(args.seeds):
            got = run({**common, "method": "fedavg", "seed": s}, warm=False)
            runs.append({"fraction": frac, "method": "fedavg", "seed": s, **got})
        for rank in parse_ints(args.ranks):
            raw = {**common, "method": "powersgd", "powersgd-rank": rank}
            for mode in ("fresh", "warm"):
                for s in parse_ints(args.seeds):
                    got = run({**raw, "seed": s}, warm=mode == "warm")
                    runs.append(
                        {"fraction": frac, "method": "powersgd", "rank": rank, "q0": mode, "seed": s, **got}
                    )
                    print(runs[-1], flush=True)
    return {"env": env_info(torch.device("cpu")), "args": vars(args), "runs": runs}


def render(data: dict[str, Any]) -> Report:
    args, runs = data["args"], data["runs"]
    table: list[list[Any]] = []
    for frac in dict.fromkeys(r["fraction"] for r in runs):
        ref = [r for r in runs if r["fraction"] == frac and r["method"] == "fedavg"]
        table.append([f"{frac:g}", "fedavg", f"{ref[0]['payload_bytes']:,}", _acc(ref), "-", "-", "-"])
        ours = [r for r in runs if r["fraction"] == frac and r["method"] == "powersgd"]
        for rank in dict.fromkeys(r["rank"] for r in ours):
            fresh = [r for r in ours if r["rank"] == rank and r["q0"] == "fresh"]
            warm = [r for r in ours if r["rank"] == rank and r["q0"] == "warm"]
            size = f"{fresh[0]['payload_bytes']:,.0f}"
            table.append(
                [f"{frac:g}", f"powersgd rank={rank}", size, _acc(fresh), _acc(warm), _cos(fresh), _cos(warm)]
            )
    headers = [
        "fraction-train",
        "method",
        "uplink bytes / payload",
        "accuracy, fresh Q0",
        "accuracy, warm start",
        "uplink cos, fresh",
        "uplink cos, warm",
    ]
    return Report(
        "PowerSGD: fresh seeded Q0 vs warm start, and the rank",
        intro=[
            f"digits/MLP, {args['num_partitions']} clients (Dirichlet 1.0), {args['rounds']} rounds of "
            f"{args['local_epochs']} local epoch(s), PowerSGD on the uplink and the compressed downlink "
            f"(error feedback on both sides), seeds {args['seeds']}; final accuracy as mean ± std over "
            "seeds. *Fresh*: Q0 drawn from (seed, round, direction, tensor) every round, as shipped. "
            "*Warm*: Q0 = the Q this sender last sent for the tensor (the paper's warm start); with "
            "fraction-train < 1 a client's Q is from the last round it was sampled in."
        ],
        body=[Table(headers, table)],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("powersgd_q0.py", parser(), measure, render, argv)


if __name__ == "__main__":
    main()
