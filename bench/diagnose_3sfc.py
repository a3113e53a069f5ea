"""Why 3SFC fails on some models and federations, and which change fixes it.

Runs the in-process loop for each *variant* (a set of config overrides, e.g. the paper's
single scale and unbounded error feedback against per-layer scales and a residual cap)
on one setting, over several seeds, and reports what compounds across rounds: the
uplink |cosine| and the client residual ratio ``|r_new| / |t|`` early and late in the
run, the downlink cosine, and the mean accuracy over the last 5 rounds.

    .venv/bin/python bench/diagnose_3sfc.py --model convnet --num-rounds 20 \\
        --variant paper:scale-mode=global,residual-cap=0 --variant layer:scale-mode=layer \\
        --out-name diagnose_convnet

Variants run in parallel worker processes (``--workers``), each with one torch thread.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from _common import (
    add_run_options,
    add_setting_args,
    env_info,
    federated_setup,
    md_table,
    mean_std,
    parse_ints,
    parse_overrides,
    report_head,
    run_federated,
    write_results,
)

SCRIPT = "diagnose_3sfc.py"
LAST = 5


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"label:key=value,key=value"`` -> (label, overrides)."""
    label, _, rest = text.partition(":")
    return label, parse_overrides([kv for kv in rest.split(",") if kv.strip()])


def _window_mean(values: Sequence[float], last: bool) -> float:
    part = list(values[-LAST:] if last else values[:LAST])
    return mean_std(part)[0]


def summarize_run(run: dict[str, Any]) -> dict[str, float]:
    """Early/late means of what compounds over rounds, and the last-5 accuracy."""
    recs = run["records"]
    ratios: dict[int, list[float]] = {}
    for m in run["client_metrics"]:
        ratios.setdefault(int(m["round"]), []).append(float(m.get("residual-ratio", float("nan"))))
    per_round_ratio = [mean_std(ratios[r])[0] for r in sorted(ratios)]
    cos = [r["mean_cosine"] for r in recs]
    down = [r["downlink_cosine"] for r in recs]
    acc = [r["accuracy"] for r in recs]
    return {
        "acc_last5": _window_mean(acc, True),
        "cos_early": _window_mean(cos, False),
        "cos_late": _window_mean(cos, True),
        "ratio_early": _window_mean(per_round_ratio, False),
        "ratio_late": _window_mean(per_round_ratio, True),
        "down_cos_late": _window_mean(down, True),
        "total_bytes": float(recs[-1]["cum_uplink_bytes"] + recs[-1]["cum_downlink_bytes"]) if recs else 0.0,
    }


def _one(job: tuple[str, int, dict[str, Any]]) -> tuple[str, int, dict[str, float]]:
    label, seed, raw = job
    return label, seed, summarize_run(run_federated(raw))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_args(p)
    add_run_options(p)
    p.add_argument("--variant", action="append", required=True, help="label:key=value,key=value")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    out_name, common = federated_setup(args, SCRIPT.removesuffix(".py"))
    variants = [parse_variant(v) for v in args.variant]
    jobs = [
        (
            label,
            seed,
            {**common, "seed": seed, "num-threads": args.threads, "run-name": f"{label}-s{seed}", **ov},
        )
        for label, ov in variants
        for seed in parse_ints(args.seeds)
    ]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(_one, jobs))
    rows, data = [], {"setting": {k: v for k, v in common.items() if k != "output-dir"}, "runs": []}
    for label, ov in variants:
        mine = [r for lab, _, r in results if lab == label]
        data["runs"] += [
            {"variant": label, "overrides": ov, "seed": s, **r} for lab, s, r in results if lab == label
        ]

        def stat(key: str, mine: list[dict[str, float]] = mine) -> str:
            m, s = mean_std([r[key] for r in mine])
            return f"{m:.3f} ± {s:.3f}"

        acc_m, acc_s = mean_std([100 * r["acc_last5"] for r in mine])
        rows.append(
            [
                label,
                f"{acc_m:.1f}% ± {acc_s:.1f}",
                stat("cos_early"),
                stat("cos_late"),
                stat("ratio_early"),
                stat("ratio_late"),
                stat("down_cos_late"),
            ]
        )
    headers = [
        "variant",
        f"acc, last {LAST} rounds",
        "cos early",
        "cos late",
        "resid. early",
        "resid. late",
        "downlink cos late",
    ]
    setting = ", ".join(f"{k} {v}" for k, v in data["setting"].items())
    lines = report_head(
        "3SFC diagnosis: what compounds across rounds",
        env_info(args.device),
        SCRIPT,
        argv,
        f"Setting: {setting}; seeds {args.seeds}. 'early'/'late' are means over the first/last {LAST} "
        "rounds; 'resid.' is the clients' |r_new| / |t| (t = update + bounded old residual); "
        "± is the standard deviation over seeds.",
    )
    lines.append(md_table(headers, rows))
    write_results(out_name, data, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
