"""Accuracy vs communicated bytes for every method (issue #5, item 1).

Command (digits/MLP on CPU; 9 methods x 3 seeds x 30 rounds, a few minutes)::

    .venv/bin/python bench/accuracy_vs_bytes.py

Quick smoke run::

    .venv/bin/python bench/accuracy_vs_bytes.py --num-rounds 3 --seeds 0 --methods fedavg,topk,e3sfc

The paper's settings (need the dataset files under ``--data-root``; not available in the
session that produced bench/results, which had no internet)::

    .venv/bin/python bench/accuracy_vs_bytes.py --dataset mnist --model mlp --data-root data
    .venv/bin/python bench/accuracy_vs_bytes.py --dataset cifar10 --model convnet --device cuda

Every method runs through ``e3sfc_core.simulate.run_reference`` (exactly what the Flower
apps run) with the same seeds; a seed fixes the Dirichlet partition, the initial model
and every client's shuffling, so all methods see the same partitions and start from the
same weights. Methods are registry names optionally followed by ``@key=value`` config
overrides, e.g. ``3sfc@synthetic-samples=1``; ``--set key=value`` applies to every run.

Writes ``bench/results/<out-name>.{json,md}`` (final accuracy mean ± std over seeds,
total uplink / downlink bytes, compression ratio vs FedAvg) and
``bench/results/<out-name>.png`` (accuracy vs cumulative bytes, log x; mean over seeds
with a ±1 std band). The default out-name is ``accuracy_vs_bytes`` for digits/MLP and
``accuracy_vs_bytes_<dataset>_<model>`` otherwise. Per-run outputs (metrics.csv,
summary.json) go to ``bench/results/runs/<out-name>/``.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    RESULTS,
    add_run_options,
    add_setting_args,
    federated_setup,
    mean_uplink_cosine,
    parse_ints,
    parse_method_spec,
    parse_overrides,
    results_name,
    run_federated,
    set_threads,
)
from bench.report import Report, Table, env_info, fmt_bytes, mean_std, run_script

DEFAULT_METHODS = "fedavg,topk,stc,signsgd,qsgd,3sfc,e3sfc,3sfc@synthetic-samples=1,e3sfc@synthetic-samples=1"


LAST = 5  # rounds averaged in the 'last rounds' column: final accuracy alone is noisy


def plot(curves: dict[str, dict[str, Any]], out: Path, title: str) -> None:
    """Accuracy vs round, vs cumulative total bytes and vs cumulative uplink bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for label, c in curves.items():
        acc = np.array(c["acc"])  # [seeds, rounds]
        m, s = acc.mean(0), acc.std(0)
        for ax, x in zip(axes, (c["round"], c["total"], c["up"]), strict=True):
            line = ax.plot(x, m, label=label, lw=1.4)[0]
            ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.15, lw=0)
    axes[0].set(xlabel="round", ylabel="test accuracy", title="accuracy vs round")
    axes[1].set(
        xlabel="cumulative bytes, uplink + downlink (log)", xscale="log", title="accuracy vs total bytes"
    )
    axes[2].set(xlabel="cumulative uplink bytes (log)", xscale="log", title="accuracy vs uplink bytes")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def defaults_text() -> str:
    """The compression defaults every run shares, read from the config (never restated)."""
    from e3sfc_core.config import ExperimentConfig

    d = ExperimentConfig()
    return (
        f"3SFC n = {d.synthetic_samples} with a {d.correction_code} correction in "
        f"{d.correction_share:g} of the payload, at most {d.max_evals} evaluations per search "
        "with the stall rule, float16 "
        f"{d.float16!s} (3SFC payloads only), Top-k/STC ratio {d.topk_ratio:g}, QSGD "
        f"{d.qsgd_levels} levels in buckets of {d.qsgd_bucket_size}, PowerSGD rank "
        f"{d.powersgd_rank}, norm clipping {'off' if not d.clip_norm_factor else d.clip_norm_factor}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_args(p)
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of method[@key=value...]")
    add_run_options(p)
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    set_threads(args.threads)
    name, common = federated_setup(args, "accuracy_vs_bytes")
    seeds = parse_ints(args.seeds)
    specs = [parse_method_spec(s) for s in args.methods.split(",") if s.strip()]

    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in specs}
    for seed in seeds:
        for label, raw in specs:
            run_name = f"{label.replace('@', '_').replace('=', '')}-s{seed}"
            res = run_federated({**common, **raw, "seed": seed, "run-name": run_name}, REPO)
            s = res["summary"]
            runs[label].append(res)
            print(
                f"seed {seed} {label:32s} acc {s['final_accuracy']:.4f} up "
                f"{fmt_bytes(s['total_uplink_bytes'])} "
                f"down {fmt_bytes(s['total_downlink_bytes'])} ({res['wall_seconds']:.1f}s)"
            )

    fedavg_total = None
    if "fedavg" in runs:
        fedavg_total = mean_std([r["summary"]["total_bytes"] for r in runs["fedavg"]])[0]
        fedavg_up = mean_std([r["summary"]["total_uplink_bytes"] for r in runs["fedavg"]])[0]
    rows, curves = [], {}
    for label, res in runs.items():
        sums = [r["summary"] for r in res]
        acc_m, acc_s = mean_std([s["final_accuracy"] for s in sums])
        last_m, last_s = mean_std([mean_std([x["accuracy"] for x in r["records"][-LAST:]])[0] for r in res])
        up = mean_std([s["total_uplink_bytes"] for s in sums])[0]
        down = mean_std([s["total_downlink_bytes"] for s in sums])[0]
        total = up + down
        ratio = (
            (fedavg_total / total) if fedavg_total else mean_std([s["compression_ratio"] for s in sums])[0]
        )
        rows.append(
            {
                "method": label,
                "final_accuracy_mean": acc_m,
                "final_accuracy_std": acc_s,
                "best_accuracy_mean": mean_std([s["best_accuracy"] for s in sums])[0],
                "last_rounds_accuracy_mean": last_m,
                "last_rounds_accuracy_std": last_s,
                "total_uplink_bytes": up,
                "total_downlink_bytes": down,
                "total_bytes": total,
                "compression_ratio_vs_fedavg": ratio,
                "uplink_ratio_vs_fedavg": (fedavg_up / up) if fedavg_total and up else float("nan"),
                "mean_uplink_cosine": mean_uplink_cosine(res),
                "wall_seconds_mean": mean_std([x["wall_seconds"] for x in res])[0],
                "final_accuracy_per_seed": [s["final_accuracy"] for s in sums],
            }
        )
        recs = [x["records"] for x in res]
        curves[label] = {
            "round": [r["round"] for r in recs[0]],
            "acc": [[r["accuracy"] for r in x] for x in recs],
            "total": [
                sum(x[i]["cum_uplink_bytes"] + x[i]["cum_downlink_bytes"] for x in recs) / len(recs)
                for i in range(len(recs[0]))
            ],
            "up": [sum(x[i]["cum_uplink_bytes"] for x in recs) / len(recs) for i in range(len(recs[0]))],
        }
    setting = (
        f"{args.dataset}/{args.model}, {args.num_partitions} clients (all train every round), Dirichlet "
        f"{args.dirichlet_alpha}, {args.local_epochs} local epochs, {args.num_rounds} rounds, seeds {seeds}"
        + (f", overrides {parse_overrides(args.set)}" if args.set else "")
    )
    plot(curves, RESULTS / f"{name}.png", setting)
    return {
        "env": env_info(args.device),
        "args": vars(args),
        "setting": setting,
        "defaults": defaults_text(),
        "results": rows,
        "curves": curves,
    }


def render(data: dict[str, Any]) -> Report:
    args, rows = data["args"], data["results"]
    name = results_name("accuracy_vs_bytes", argparse.Namespace(**args))
    fedavg = any(r["method"] == "fedavg" for r in rows)
    table = [
        [
            r["method"],
            f"{r['final_accuracy_mean']:.2%} ± {r['final_accuracy_std']:.2%}",
            f"{r['last_rounds_accuracy_mean']:.2%} ± {r['last_rounds_accuracy_std']:.2%}",
            f"{r['best_accuracy_mean']:.2%}",
            fmt_bytes(r["total_uplink_bytes"]),
            fmt_bytes(r["total_downlink_bytes"]),
            fmt_bytes(r["total_bytes"]),
            f"{r['compression_ratio_vs_fedavg']:.1f}x",
            f"{ratio:.0f}x" if (ratio := r["uplink_ratio_vs_fedavg"]) == ratio else "-",
            f"{r['mean_uplink_cosine']:.3f}",
            f"{r['wall_seconds_mean']:.1f}",
        ]
        for r in rows
    ]
    headers = [
        "method",
        "final acc (mean ± std)",
        f"mean acc, last {LAST} rounds",
        "best acc",
        "uplink",
        "downlink",
        "total",
        "total vs FedAvg" if fedavg else "total vs dense equivalent",
        "uplink vs FedAvg",
        "mean uplink |cos|",
        "wall s/run",
    ]
    defaults = data["defaults"]
    return Report(
        f"Accuracy vs bytes ({args['dataset']}/{args['model']})"
        + ("" if name.startswith("accuracy_vs_bytes") else f": {name}"),
        intro=[
            f"Setting: {data['setting']}. Defaults otherwise ({defaults}). A method runs as its paper "
            "runs it unless `@downlink=compressed` says otherwise: `3sfc`, Top-k, STC, signSGD, "
            "QSGD and PowerSGD compress the uplink and send the dense model down; `e3sfc` "
            "compresses both ways (relaying the round's payloads where that is at most 2% of the "
            "dense weights). Bytes are means over seeds of everything sent (headers included; "
            "downlink = full weights to every client except in round 1, or the compressed "
            "downlink). 'vs FedAvg' = FedAvg's bytes / the method's bytes"
            + (
                "."
                if fedavg
                else " (no FedAvg run here: the ratio is summary.json's "
                "compression_ratio, vs the dense float32 equivalent of the same traffic)."
            )
            + " Wall seconds are noisy: the machine was shared."
        ],
        body=[Table(headers, table), f"![accuracy vs bytes]({Path(name).name}.png)"],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    name = partial(results_name, "accuracy_vs_bytes")
    return run_script("accuracy_vs_bytes.py", parser(), measure, render, argv, name=name)


if __name__ == "__main__":
    main()
