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
from functools import partial
from typing import Any

from bench.common import (
    add_run_options,
    add_setting_args,
    federated_setup,
    parse_ints,
    parse_overrides,
    results_name,
    run_federated,
)
from bench.report import Report, Table, env_info, mean_std, run_script

LAST = 5
# the setting's keys in federated_setup's order (then the --set overrides, sorted)
SETTING_KEYS = "dataset model data-root num-rounds num-partitions dirichlet-alpha local-epochs device".split()


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_args(p)
    add_run_options(p)
    p.add_argument("--variant", action="append", required=True, help="label:key=value,key=value")
    p.add_argument("--workers", type=int, default=2)
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    _, common = federated_setup(args, "diagnose_3sfc")
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
    return {
        "env": env_info(args.device),
        "args": vars(args),
        "setting": {k: v for k, v in common.items() if k != "output-dir"},
        "runs": [
            {"variant": label, "overrides": ov, "seed": s, **r}
            for label, ov in variants
            for lab, s, r in results
            if lab == label
        ],
    }


def render(data: dict[str, Any]) -> Report:
    runs = data["runs"]

    def stat(mine: list[dict[str, Any]], key: str, scale: float = 1, fmt: str = "{:.3f} ± {:.3f}") -> str:
        return fmt.format(*mean_std([scale * r[key] for r in mine]))

    rows = []
    for label in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == label]
        rows.append(
            [label, stat(mine, "acc_last5", 100, "{:.1f}% ± {:.1f}")]
            + [stat(mine, k) for k in ("cos_early", "cos_late", "ratio_early", "ratio_late", "down_cos_late")]
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
    order = {k: i for i, k in enumerate(SETTING_KEYS)}
    keys = sorted(data["setting"], key=lambda k: (order.get(k, len(order)), k))
    setting = ", ".join(f"{k} {data['setting'][k]}" for k in keys)
    seeds = ",".join(dict.fromkeys(str(r["seed"]) for r in runs))
    return Report(
        "3SFC diagnosis: what compounds across rounds",
        intro=[
            f"Setting: {setting}; seeds {seeds}. 'early'/'late' are means over the first/last {LAST} "
            "rounds; 'resid.' is the clients' |r_new| / |t| (t = update + bounded old residual); "
            "± is the standard deviation over seeds."
        ],
        body=[Table(headers, rows)],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    name = partial(results_name, "diagnose_3sfc")
    return run_script("diagnose_3sfc.py", parser(), measure, render, argv, name=name)


if __name__ == "__main__":
    main()
