"""Budget scheduler (issue 12): does a policy beat the best fixed n at the same total bytes?

For each *cell* (digits MLP, digits LeNet-5), seed and total budget (a multiple of what a
fixed n = 4 run sends, both ways, catch-up included) it runs, with the in-process loop:

* ``constant``, ``decay`` and ``adaptive`` under that budget (default tunables), and
* ``fixed``: the largest fixed n whose whole run fits the budget (constant policy with
  ``n_min = n_max = n``); when no n fits, n = 1, which then stops early like the rest.

A fixed run's bytes are the server's forecast (:meth:`FederatedServer.forecast`) at that
n: exact payload bounds for the seeded sample, so the forecast of n = 4 is the budget's
unit and is known before anything runs. The federation samples half of 10 clients each
round (``fraction-train`` 0.5), so catch-up is part of every run.

Every run appends one JSON line to ``bench/results/budget.jsonl`` as soon as it ends;
runs already there are skipped (stop and resume at will). ``--report`` only renders
``bench/results/budget.md`` from the lines present (with the environment of the last
measuring run, kept in ``budget.json``)::

    nice -n 5 .venv/bin/python bench/budget.py --cells digits-mlp --rounds 20 --seeds 0,1,2
    .venv/bin/python bench/budget.py --report
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import parse_ints, run_federated
from bench.report import REPO, Report, Table, fmt_bytes, mean_std, read_jsonl, run_resumable

SCRIPT = "budget.py"
LAST = 5
REFERENCE_N = 4
FACTORS = (0.25, 1.0, 4.0)
POLICIES = ("constant", "decay", "adaptive")
N_MAX = 32  # above the default 16, so that 4x the n = 4 run can be spent
CELLS: dict[str, dict[str, Any]] = {
    "digits-mlp": {"dataset": "digits", "model": "mlp"},
    "digits-lenet5": {"dataset": "digits", "model": "lenet5"},
}
BASE: dict[str, Any] = {
    "method": "e3sfc",
    "downlink": "compressed",
    "num-partitions": 10,
    "fraction-train": 0.5,
    "synthetic-samples-max": N_MAX,
    "device": "cpu",
    "num-threads": 1,
}


def setting(cell: str, seed: int, rounds: int) -> dict[str, Any]:
    """The run config shared by every row of one cell and seed."""
    return {**BASE, **CELLS[cell], "seed": seed, "num-rounds": rounds}


def fixed_costs(raw: dict[str, Any]) -> dict[int, int]:
    """Forecast bytes of a whole fixed-n run, per n in 1..N_MAX (nothing is trained)."""
    from e3sfc_core.config import ExperimentConfig
    from e3sfc_core.experiment import Experiment

    cfg = ExperimentConfig.from_run_config({**raw, "output-dir": "/tmp/e3sfc-budget-forecast"})
    server = Experiment(cfg, REPO).server
    first = {c: server.downlink_for(c) for c in server.sample(1, range(cfg.num_partitions))}
    demands = server.forecast(1, first)
    return {n: sum(d.cost(server.payload_size, n, n) for d in demands) for n in range(1, N_MAX + 1)}


def default_n_min() -> int:
    """The smaller of the config's default ``budget-n-min-*`` (the policies' floor)."""
    from e3sfc_core.config import ExperimentConfig

    fields = ExperimentConfig.model_fields
    return min(int(fields["budget_n_min_uplink"].default), int(fields["budget_n_min_downlink"].default))


def runs_for(raw: dict[str, Any], costs: dict[int, int]) -> list[tuple[str, float, dict[str, Any]]]:
    """(label, budget factor, config) of every run of one cell and seed."""
    out = []
    for factor in FACTORS:
        total = int(factor * costs[REFERENCE_N])
        budget = {**raw, "budget-total-bytes": total}
        fits = [n for n, c in costs.items() if c <= total]
        n = max(fits) if fits else 1
        fixed = {"budget-n-min-uplink": n, "budget-n-min-downlink": n, "synthetic-samples-max": n}
        out.append((f"fixed n={n}", factor, {**budget, **fixed, "synthetic-samples": min(n, 2)}))
        out += [(p, factor, {**budget, "budget-policy": p}) for p in POLICIES]
        if n < default_n_min():  # no n >= n_min fits: the policies also at the fixed run's floor
            floor = {"budget-n-min-uplink": n, "budget-n-min-downlink": n}
            out += [(f"{p}, n_min {n}", factor, {**budget, "budget-policy": p, **floor}) for p in POLICIES]
    return out


def row_of(
    cell: str, label: str, factor: float, raw: dict[str, Any], result: dict[str, Any]
) -> dict[str, Any]:
    """One JSON line: what ran and what it reached and spent."""
    recs, summary = result["records"], result["summary"]
    budget = summary["budget"]
    accs = [r["accuracy"] for r in recs]
    sent = sum(r["uplink_bytes"] + r["downlink_bytes"] for r in recs)
    return {
        "cell": cell,
        "seed": raw["seed"],
        "rounds_planned": raw["num-rounds"],
        "factor": factor,
        "label": label,
        "total": raw["budget-total-bytes"],
        "spent": budget["spent_total"],
        "metrics_bytes": sent,
        "rounds_run": len(recs),
        "final_accuracy": accs[-1] if accs else float("nan"),
        "last_accuracy": mean_std(accs[-LAST:])[0],
        "n_uplink": [r["n_uplink"] for r in recs],
        "stopped_early": summary.get("stopped_early", ""),
        "wall_seconds": result["wall_seconds"],
    }


def measure(args: argparse.Namespace, jsonl: Path) -> None:
    """Run every missing row, appending each to the JSONL file as it ends."""
    rounds = args.rounds
    done = {(r["cell"], r["seed"], r["rounds_planned"], r["factor"], r["label"]) for r in read_jsonl(jsonl)}
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    for cell in [c.strip() for c in args.cells.split(",") if c.strip()]:
        for seed in parse_ints(args.seeds):
            raw = setting(cell, seed, rounds)
            for label, factor, cfg in runs_for(raw, fixed_costs(raw)):
                if (cell, seed, rounds, factor, label) in done:
                    continue
                name = f"{cell}-s{seed}-r{rounds}-x{factor}-{label.replace(' ', '').replace('=', '')}"
                cfg = {**cfg, "output-dir": "outputs/bench-budget", "run-name": name}
                row = row_of(cell, label, factor, cfg, run_federated(cfg))
                with jsonl.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(
                    f"{name}: acc {row['last_accuracy']:.4f}, spent {row['spent']}/{row['total']}, "
                    f"{row['rounds_run']} rounds, {row['wall_seconds']:.0f} s",
                    flush=True,
                )


def verdict(
    cell: str,
    rounds: int,
    factor: float,
    adaptive: list[dict[str, Any]],
    fixed: list[dict[str, Any]],
) -> str:
    """adaptive against the best fixed n, paired by seed: beats or is below when the mean
    difference is larger than its spread over seeds, else matches."""
    by_seed = {r["seed"]: r["last_accuracy"] for r in fixed}
    diffs = [r["last_accuracy"] - by_seed[r["seed"]] for r in adaptive if r["seed"] in by_seed]
    mean, sd = mean_std(diffs)
    word = "matches" if abs(mean) <= sd else ("beats" if mean > 0 else "below")
    per_seed = ", ".join(f"{100 * d:+.2f}" for d in diffs)
    return (
        f"- {cell}, {rounds} rounds, {factor}x: {adaptive[0]['label']} - fixed = "
        f"{100 * mean:+.2f} ± {100 * sd:.2f} "
        f"points over {len(diffs)} seed(s) ({per_seed}): **{word}**"
    )


def render(data: dict[str, Any]) -> Report:
    rows = data["rows"]
    groups: dict[tuple[str, int, float], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        key = (r["cell"], r["rounds_planned"], r["factor"])
        groups.setdefault(key, {}).setdefault(r["label"], []).append(r)
    table, verdicts = [], []
    for (cell, rounds, factor), by_label in sorted(groups.items()):
        fixed = next((rs for label, rs in by_label.items() if label.startswith("fixed")), [])
        for label in sorted(by_label, key=lambda s: (not s.startswith("fixed"), s)):
            rs = by_label[label]
            acc, sd = mean_std([r["last_accuracy"] for r in rs])
            total, final, ran = (
                mean_std([r[k] for r in rs])[0] for k in ("total", "final_accuracy", "rounds_run")
            )
            spent = mean_std([r["spent"] / r["total"] for r in rs])[0]
            within = "yes" if all(r["spent"] <= r["total"] for r in rs) else "NO"
            accuracy = f"{100 * acc:.2f} ± {100 * sd:.2f}"
            table.append([cell, rounds, f"{factor}x", fmt_bytes(total), label, len(rs), accuracy])
            table[-1] += [f"{100 * final:.2f}", f"{100 * spent:.1f}%", f"{ran:.1f}", within]
            if label.split(",")[0] == "adaptive" and fixed:
                verdicts.append(verdict(cell, rounds, factor, rs, fixed))
    runs: dict[tuple[str, int], set[int]] = {}
    for r in rows:
        runs.setdefault((r["cell"], r["rounds_planned"]), set()).add(r["seed"])
    commands = [
        f"`nice -n 5 .venv/bin/python bench/{SCRIPT} --cells {cell} --rounds {rounds} "
        f"--seeds {','.join(str(s) for s in sorted(seeds))}`"
        for (cell, rounds), seeds in sorted(runs.items())
    ]
    headers = ["cell", "rounds", "budget", "total", "run", "seeds", "accuracy %", "final %", "spent"]
    headers += ["rounds run", "within"]
    return Report(
        "Budget scheduler: policies against the best fixed n at equal total bytes",
        intro=[
            "Setting: E-3SFC (3SFC both ways, corrected payload), 10 clients, half sampled per round "
            "(catch-up included in every byte count), default local training; budget = factor x the "
            "forecast bytes of a fixed n = 4 run of the same cell and seed. `fixed n=k`: the largest "
            "fixed n whose whole run fits (n = 1 when none does; it then stops early like the others). "
            f"Accuracy: mean over the last {LAST} rounds run, mean ± std over seeds. `within`: "
            "spent <= total in every run. Where no fixed n fits (0.25x here) every run stops when "
            "the budget is spent, and the policies, held at n >= `budget-n-min-*` = 2, all make "
            "the same choices; rows `<policy>, n_min 1` run them at the fixed run's floor instead "
            "(the scheduler warns at round 1 how far such a budget reaches). Each JSON line was "
            "written by the checkout it ran on (see the "
            "history of `bench/results/budget.jsonl`); the rows measured before commit 4b81295, "
            "which counted payload bytes only, are kept in `budget_payload_bytes.jsonl`, and those "
            "measured on format v4 with the float correction code in "
            "`archive/budget_v4_float_code.jsonl`."
        ],
        body=[
            "Rows in this file come from: " + "; ".join(commands) + ".",
            Table(headers, table),
            "Goal: adaptive matches or beats the best fixed n (paired by seed; matches: the mean "
            "difference is within its spread over seeds):",
            "\n".join(verdicts),
        ],
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="digits-mlp,digits-lenet5", help=f"comma-separated, of {sorted(CELLS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out-name", default="budget", help="results/NAME.{jsonl,json,md}")
    return p


def load(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the report is made from: every run of the JSON lines."""
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_resumable("budget.py", parser(), measure, load, render, argv)


if __name__ == "__main__":
    main()
