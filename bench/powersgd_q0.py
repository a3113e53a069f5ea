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
from _common import env_info, md_table, parse_ints, print_table, report_head, write_results

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


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--ranks", default="1,2,4,8")
    p.add_argument("--fractions", default="1.0,0.3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--num-partitions", type=int, default=10)
    p.add_argument("--out-name", default="powersgd_q0")
    args = p.parse_args(argv)

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
    seeds = parse_ints(args.seeds)
    fractions = [float(f) for f in args.fractions.split(",")]
    runs: list[dict[str, Any]] = []
    table = []
    for frac in fractions:
        common = {**base, "fraction-train": frac}
        ref = [run({**common, "method": "fedavg", "seed": s}, warm=False) for s in seeds]
        runs += [
            {"fraction": frac, "method": "fedavg", "seed": s, **r} for s, r in zip(seeds, ref, strict=True)
        ]
        dense = f"{ref[0]['payload_bytes']:,}"
        table.append([f"{frac:g}", "fedavg", dense, mean_std([r["accuracy"] for r in ref]), "-", "-", "-"])
        for rank in parse_ints(args.ranks):
            got: dict[str, list[dict[str, Any]]] = {}
            for mode in ("fresh", "warm"):
                raw = {**common, "method": "powersgd", "powersgd-rank": rank}
                got[mode] = [run({**raw, "seed": s}, warm=mode == "warm") for s in seeds]
                runs += [
                    {"fraction": frac, "method": "powersgd", "rank": rank, "q0": mode, "seed": s, **r}
                    for s, r in zip(seeds, got[mode], strict=True)
                ]
            per_payload = got["fresh"][0]["payload_bytes"]
            table.append(
                [
                    f"{frac:g}",
                    f"powersgd rank={rank}",
                    f"{per_payload:,.0f}",
                    mean_std([r["accuracy"] for r in got["fresh"]]),
                    mean_std([r["accuracy"] for r in got["warm"]]),
                    f"{statistics.fmean(r['mean_cosine'] for r in got['fresh']):.3f}",
                    f"{statistics.fmean(r['mean_cosine'] for r in got['warm']):.3f}",
                ]
            )
            print(table[-1], flush=True)
    headers = [
        "fraction-train",
        "method",
        "uplink bytes / payload",
        "accuracy, fresh Q0",
        "accuracy, warm start",
        "uplink cos, fresh",
        "uplink cos, warm",
    ]
    print_table(headers, table)
    env = env_info(torch.device("cpu"))
    md = report_head(
        "PowerSGD: fresh seeded Q0 vs warm start, and the rank",
        env,
        "powersgd_q0.py",
        argv,
        f"digits/MLP, {args.num_partitions} clients (Dirichlet 1.0), {args.rounds} rounds of "
        f"{args.local_epochs} local epoch(s), PowerSGD on the uplink and the compressed downlink "
        f"(error feedback on both sides), seeds {args.seeds}; final accuracy as mean ± std over "
        "seeds. *Fresh*: Q0 drawn from (seed, round, direction, tensor) every round, as shipped. "
        "*Warm*: Q0 = the Q this sender last sent for the tensor (the paper's warm start); with "
        "fraction-train < 1 a client's Q is from the last round it was sampled in.",
    )
    md += [md_table(headers, table), ""]
    data = {"env": env, "args": vars(args), "runs": runs}
    write_results(args.out_name, data, "\n".join(md))
    return data


if __name__ == "__main__":
    main()
