"""``e3sfc-compare outputs/*/``: overlay several runs in one plot and one table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from e3sfc_core.reporting import plot_runs, read_metrics


def table(run_dirs: list[Path]) -> str:
    """A markdown table of the runs' summaries."""
    lines = [
        "| run | method | final acc | best acc | uplink bytes | downlink bytes | vs FedAvg |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in run_dirs:
        s = json.loads((d / "summary.json").read_text())
        ratio = s.get("compression_ratio")
        lines.append(
            f"| {d.name} | {s['method']} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | "
            f"{s['total_uplink_bytes']:,} | {s['total_downlink_bytes']:,} | "
            + (f"{ratio:.1f}x less |" if ratio else "n/a |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="e3sfc-compare", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.csv, summary.json)")
    parser.add_argument("--out", type=Path, default=Path("comparison.png"), help="plot file to write")
    args = parser.parse_args(argv)
    runs = [d for d in args.runs if (d / "summary.json").exists() and (d / "metrics.csv").exists()]
    if not runs:
        print("e3sfc-compare: no run directory with metrics.csv and summary.json given", file=sys.stderr)
        return 2
    plot_runs({d.name: read_metrics(d / "metrics.csv") for d in runs}, args.out)
    print(table(runs))
    print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
