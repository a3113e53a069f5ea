"""Run outputs: ``metrics.csv`` (a row per round), ``summary.json`` and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes
from .protocol import instruction_size, reply_size
from .server import RoundRecord

CSV_COLUMNS = [f.name for f in fields(RoundRecord)]


def format_round(rec: RoundRecord) -> str:
    """The one-line progress report printed after every round."""
    return (
        f"round {rec.round:3d} | acc {rec.accuracy:6.2%} | loss {rec.loss:.4f} | "
        f"up {rec.uplink_bytes:>9,d} B | down {rec.downlink_bytes:>9,d} B | "
        f"cos {rec.mean_cosine:.3f} | n {rec.n_uplink}/{rec.n_downlink}"
        + (" | SKIPPED" if rec.skipped else "")
        + (f" | dropped {rec.dropped}" if rec.dropped else "")
    )


def write_metrics(path: Path, records: list[RoundRecord]) -> None:
    """Rewrite ``metrics.csv`` with every round so far, atomically (a crash mid-write
    leaves the previous file, never a truncated one)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for rec in records:
        writer.writerow(asdict(rec))
    atomic_write_bytes(path, text.getvalue().encode())


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Load a ``metrics.csv`` back as floats (booleans become 0/1)."""
    rows = []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            rows.append(
                {k: float(v == "True") if v in ("True", "False") else float(v) for k, v in row.items()}
            )
    return rows


def summarize(
    records: list[RoundRecord],
    config: dict[str, Any],
    dense_bytes_per_payload: int,
    wall_seconds: float,
    budget_report: dict[str, Any],
) -> dict[str, Any]:
    """Final numbers of a run, including what FedAvg would have sent for the same traffic
    pattern: one message per sampled client each way, each with one dense float32 payload
    except round 1's instructions, which carry none (every client builds the initial
    model from the seed)."""
    accs = [r.accuracy for r in records if not math.isnan(r.accuracy)]
    up = sum(r.uplink_bytes for r in records)
    down = sum(r.downlink_bytes for r in records)
    dense = dense_bytes_per_payload
    fedavg = sum(
        r.sampled * (reply_size(dense) + instruction_size([dense] if r.round > 1 else [])) for r in records
    )
    return {
        "method": config.get("method"),
        "dataset": config.get("dataset"),
        "model": config.get("model"),
        "rounds": len(records),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "total_uplink_bytes": up,
        "total_downlink_bytes": down,
        "total_bytes": up + down,
        "fedavg_equivalent_bytes": fedavg,
        "compression_ratio": (fedavg / (up + down)) if up + down else None,
        "dropped_replies": sum(r.dropped for r in records),
        "skipped_rounds": sum(1 for r in records if r.skipped),
        "wall_seconds": wall_seconds,
        "budget": budget_report,
        "config": config,
    }


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (pretty-printed, sorted keys)."""
    atomic_write_bytes(path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())


def plot_runs(runs: dict[str, list[dict[str, float]]], out: Path) -> None:
    """Accuracy vs round and accuracy vs cumulative bytes (log scale), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        rounds = [r["round"] for r in rows]
        acc = [r["accuracy"] for r in rows]
        cum = [r["cum_uplink_bytes"] + r["cum_downlink_bytes"] for r in rows]
        ax1.plot(rounds, acc, label=name)
        ax2.plot(cum, acc, label=name)
    ax1.set(xlabel="round", ylabel="test accuracy", title="accuracy vs round")
    ax2.set(
        xlabel="cumulative bytes (uplink + downlink)",
        ylabel="test accuracy",
        xscale="log",
        title="accuracy vs bytes",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
