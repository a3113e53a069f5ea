"""Accuracy of every method under one fixed total byte budget (issue #5, item 2).

Command (digits/MLP on CPU, a few minutes)::

    .venv/bin/python bench/equal_budget.py

Quick smoke run::

    .venv/bin/python bench/equal_budget.py --num-rounds 5 --seeds 0 --skip-fixed

How the budget and the knobs are chosen

* The budget ``B`` is what E-3SFC spends in its default run (n = ``synthetic-samples``
  = 4 both ways, no scheduler) over ``--num-rounds`` rounds, times ``--budget-multiplier``
  (or ``--budget-total-bytes`` if given). That reference run is the first row.
* Every method then runs with ``budget-total-bytes = B`` (the run stops before a round
  that would exceed it; ``summary["stopped_early"]`` says so) and with
  ``downlink = compressed``: each method also compresses the server's broadcast with its
  own compressor, since a dense float32 downlink alone would exceed B in one round.
  With all clients training every round a run sends ``C * (R * up + (R - 1) * down)``
  payload bytes (no downlink in round 1, one payload per client after) plus every
  message's own fields, so each method's knob is set to the largest value whose payload
  is at most ``(B - fields) / (C * (2R - 1))`` bytes:
  Top-k and STC ratio (exact k), 3SFC n. signSGD and FedAvg run at their fixed size
  until the budget is spent and their accuracy at that point is reported, with the rounds
  they completed. QSGD's payload size depends on the data (entropy-coded levels): a hard
  budget must reserve its bound before each round, which charges it several times what
  it sends, so QSGD runs without a budget (both ways compressed) and is read at its last
  round within B (``cut_at_budget``), at its paper setting and at s = 1, its fewest
  levels. Uplink-only 3SFC (dense downlink) is shown as the paper runs it.
* E-3SFC with the budget scheduler: ``budget-policy`` constant / decay / adaptive with
  the same total (n chosen per round and direction in [1, ``synthetic-samples-max``]:
  ``budget-n-min-*`` lowered from its default 2 to 1, so that a budget sized on the
  default's n = 2 leaves the scheduler room); planned vs spent bytes come from
  ``summary.json["budget"]``.

Writes ``bench/results/<out-name>.{json,md}``; per-run outputs go to
``bench/results/runs/<out-name>/``.
"""

from __future__ import annotations

import argparse
import logging
import math
from functools import partial
from typing import Any

from bench.common import (
    REPO,
    add_run_options,
    add_setting_args,
    federated_setup,
    mean_uplink_cosine,
    parse_ints,
    results_name,
    run_federated,
    set_threads,
)
from bench.report import Report, Table, env_info, fmt_bytes, mean_std, run_script
from e3sfc_core.baselines import topk_count
from e3sfc_core.budget import largest_fitting
from e3sfc_core.compressor import Budget, build_compressor
from e3sfc_core.config import ExperimentConfig
from e3sfc_core.datasets import get_spec
from e3sfc_core.models import build_model
from e3sfc_core.protocol import instruction_size, reply_size
from e3sfc_core.synthetic_gradient import parameter_sizes
from e3sfc_core.tensors import num_params


def size_of(method: str, raw: dict[str, Any], numel: int, n: int = 1) -> int:
    """Payload bound of ``method`` in the run ``raw`` (its model's layer count sizes 3SFC)."""
    cfg = ExperimentConfig.from_run_config({**raw, "method": method})
    spec = get_spec(cfg.dataset)
    model = build_model(cfg.model, tuple(spec.input_shape), spec.n_classes, cfg.seed)
    comp = build_compressor(cfg.compressor_name, cfg.compressor_settings(len(parameter_sizes(model))), spec)
    return comp.encoded_size(numel, Budget(n))


def result_row(
    label: str, knob: str, accs: list[float], records: list[dict[str, Any]], **rest: Any
) -> dict[str, Any]:
    """One table row: final accuracies over seeds, seed 0's per-round samples, and ``rest``."""
    acc_m, acc_s = mean_std(accs)
    return {
        "method": label,
        "knob": knob,
        "final_accuracy_mean": acc_m,
        "final_accuracy_std": acc_s,
        "final_accuracy_per_seed": accs,
        "n_uplink_per_round": [r["n_uplink"] for r in records],
        "n_downlink_per_round": [r["n_downlink"] for r in records],
        **rest,
    }


def summarize_runs(label: str, knob: str, res: list[dict[str, Any]]) -> dict[str, Any]:
    sums = [r["summary"] for r in res]
    accs = [s["final_accuracy"] if s["final_accuracy"] is not None else float("nan") for s in sums]
    budget = sums[0]["budget"]
    planned = [sum(r["planned_uplink"] + r["planned_downlink"] for r in s["budget"]["rounds"]) for s in sums]
    return result_row(
        label,
        knob,
        accs,
        res[0]["records"],
        rounds_completed=[s["rounds"] for s in sums],
        stopped_early=[bool(s["stopped_early"]) for s in sums],
        stopped_reason=sums[0]["stopped_early"],
        total_bytes=mean_std([s["total_bytes"] for s in sums])[0],
        uplink_bytes=mean_std([s["total_uplink_bytes"] for s in sums])[0],
        downlink_bytes=mean_std([s["total_downlink_bytes"] for s in sums])[0],
        budget_total=budget["total"],
        budget_spent=mean_std([s["budget"]["spent_total"] for s in sums])[0],
        budget_planned_sum=mean_std(planned)[0],
        overspent=max(max(0, s["budget"]["spent_total"] - s["budget"]["total"]) for s in sums),
        planned_per_round=[r["planned_uplink"] + r["planned_downlink"] for r in budget["rounds"]],
        spent_per_round=[r["spent_uplink"] + r["spent_downlink"] for r in budget["rounds"]],
        mean_uplink_cosine=mean_uplink_cosine(res),
    )


def cut_at_budget(label: str, knob: str, res: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """A run without a budget, read at its last round whose cumulative bytes (every
    message both ways) were within ``budget``: what the method reaches under that budget
    when its true sizes are known in hindsight. For methods whose payload size depends on
    the data (QSGD's entropy-coded levels), so that a hard budget, which must reserve
    the largest size a payload can take before sending it, does not charge them their
    bound instead of what they send."""
    accs, rounds, up, down, cos = [], [], [], [], []
    for r in res:
        fits = [x for x in r["records"] if x["cum_uplink_bytes"] + x["cum_downlink_bytes"] <= budget]
        accs.append(fits[-1]["accuracy"] if fits else math.nan)
        rounds.append(len(fits))
        up.append(fits[-1]["cum_uplink_bytes"] if fits else 0)
        down.append(fits[-1]["cum_downlink_bytes"] if fits else 0)
        cos += [x["mean_cosine"] for x in fits]
    spent = mean_std([u + d for u, d in zip(up, down, strict=True)])[0]
    return result_row(
        label,
        knob,
        accs,
        res[0]["records"],
        rounds_completed=rounds,
        stopped_early=[n < len(r["records"]) for n, r in zip(rounds, res, strict=True)],
        stopped_reason="cut at the budget",
        total_bytes=spent,
        uplink_bytes=mean_std(up)[0],
        downlink_bytes=mean_std(down)[0],
        budget_total=0,
        budget_spent=spent,
        budget_planned_sum=math.nan,
        overspent=0,
        planned_per_round=[],
        spent_per_round=[],
        mean_uplink_cosine=mean_std(cos)[0] if cos else math.nan,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_args(p)
    p.add_argument("--budget-total-bytes", type=int, default=0, help="0: E-3SFC's default run's total")
    p.add_argument("--budget-multiplier", type=float, default=1.0)
    p.add_argument("--policies", default="constant,decay,adaptive")
    p.add_argument(
        "--skip-fixed", action="store_true", help="skip the fixed-size methods (fedavg, signsgd, qsgd, 3sfc)"
    )
    add_run_options(p)
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    set_threads(args.threads)
    _, common = federated_setup(args, "equal_budget")
    seeds = parse_ints(args.seeds)
    base_cfg = ExperimentConfig.from_run_config({**common, "method": "e3sfc"})
    spec = get_spec(args.dataset)
    numel = num_params(build_model(args.model, tuple(spec.input_shape), spec.n_classes, 0))
    if base_cfg.fraction_train < 1.0:
        print("note: with fraction-train < 1 catch-up downlinks make the knob formula approximate")

    def run_all(label: str, raw: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for seed in seeds:
            name = f"{label}-s{seed}".replace(" ", "_").replace("=", "").replace("/", "_")
            res = run_federated({**common, **raw, "seed": seed, "run-name": name}, REPO)
            s = res["summary"]
            acc = s["final_accuracy"]
            print(
                f"seed {seed} {label:34s} rounds {s['rounds']:3d} acc "
                f"{acc if acc is None else round(acc, 4)} "
                f"bytes {fmt_bytes(s['total_bytes'])}{' (stopped early)' if s['stopped_early'] else ''} "
                f"({res['wall_seconds']:.1f}s)"
            )
            out.append(res)
        return out

    rows: list[dict[str, Any]] = []
    # 1) reference: E-3SFC default, no budget
    n_def = base_cfg.synthetic_samples
    ref = run_all(f"e3sfc n={n_def} (reference, no budget)", {"method": "e3sfc"})
    rows.append(summarize_runs(f"e3sfc n={n_def} (reference, no budget)", f"n={n_def}", ref))
    budget = args.budget_total_bytes or int(
        math.floor(ref[0]["summary"]["total_bytes"] * args.budget_multiplier)
    )
    C, R = args.num_partitions, args.num_rounds
    # every message's own fields first: C replies and C instructions per round, and a
    # length field per payload the C * (R - 1) instructions after round 1 carry
    fields = C * R * (reply_size(0) + instruction_size([])) + C * (R - 1) * (
        instruction_size([0]) - instruction_size([])
    )
    per_payload = (budget - fields) // (C * (2 * R - 1))
    print(f"budget {budget:,} bytes -> at most {per_payload:,} bytes per payload (C={C}, R={R})")

    b = {"budget-total-bytes": budget, "downlink": "compressed"}
    knobs: list[tuple[str, str, dict[str, Any]]] = []
    n_fit = largest_fitting(lambda n: size_of("3sfc", common, numel, n) <= per_payload, 1, 4096)
    if n_fit is not None:
        smax = max(n_fit, base_cfg.synthetic_samples_max)
        knobs.append(
            (
                f"e3sfc n={n_fit} (budget, constant)",
                f"n={n_fit}",
                {
                    "method": "e3sfc",
                    "synthetic-samples": n_fit,
                    "synthetic-samples-max": n_fit,
                    "budget-n-min-uplink": n_fit,
                    "budget-n-min-downlink": n_fit,
                    **b,
                },
            )
        )
    else:
        smax = base_cfg.synthetic_samples_max
    for policy in [x for x in args.policies.split(",") if x]:
        knobs.append(
            (
                f"e3sfc scheduler {policy}",
                f"n in [1, {smax}]",
                {
                    "method": "e3sfc",
                    "budget-policy": policy,
                    "synthetic-samples-max": smax,
                    "budget-n-min-uplink": 1,
                    "budget-n-min-downlink": 1,
                    **b,
                },
            )
        )
    for method in ("topk", "stc"):
        k = largest_fitting(
            lambda kk, m=method: size_of(m, {**common, "topk-ratio": kk / numel}, numel) <= per_payload,
            1,
            numel,
        )
        if k is None:
            continue
        ratio = k / numel
        assert topk_count(ratio, numel) == k
        knobs.append(
            (f"{method} k={k}", f"ratio={ratio:.5f} (k={k})", {"method": method, "topk-ratio": ratio, **b})
        )
    cut: list[tuple[str, str, dict[str, Any]]] = []
    if not args.skip_fixed:
        for method in ("signsgd", "fedavg"):
            size = size_of(method, common, numel)
            knobs.append((f"{method} (fixed size)", f"{size:,} B/payload", {"method": method, **b}))
        # QSGD's levels are entropy-coded: a payload is far below its bound, so it runs
        # without a budget and is read at the budget (its paper setting, and its fewest levels)
        for levels in (base_cfg.qsgd_levels, 1):
            q = {"qsgd-levels": levels, "qsgd-bucket-size": base_cfg.qsgd_bucket_size}
            bound = size_of("qsgd", {**common, **q}, numel)
            knob = f"s={levels}, bucket {base_cfg.qsgd_bucket_size} (bound {bound:,} B/payload)"
            cut.append(
                (
                    f"qsgd s={levels} (cut at the budget)",
                    knob,
                    {"method": "qsgd", "downlink": "compressed", **q},
                )
            )
        knobs.append(
            (
                "3sfc uplink-only, dense downlink",
                f"n={n_def}",
                {"method": "3sfc", "budget-total-bytes": budget, "downlink": "dense"},
            )
        )

    for label, knob, raw in knobs:
        rows.append(summarize_runs(label, knob, run_all(label, raw)))
    for label, knob, raw in cut:
        rows.append(cut_at_budget(label, knob, run_all(label, raw), budget))

    setting = (
        f"{args.dataset}/{args.model} ({numel:,} weights), {C} clients (all train every round), Dirichlet "
        f"{args.dirichlet_alpha}, {args.local_epochs} local epochs, up to {R} rounds, seeds {seeds}"
    )
    return {
        "env": env_info(args.device),
        "args": vars(args),
        "setting": setting,
        "budget_total_bytes": budget,
        "max_bytes_per_payload": per_payload,
        "results": rows,
    }


def render(data: dict[str, Any]) -> Report:
    args, rows, budget = data["args"], data["results"], data["budget_total_bytes"]
    headers = [
        "method",
        "knob",
        "final acc (mean ± std)",
        "rounds",
        "spent",
        "uplink",
        "downlink",
        "planned (sum)",
        "spent / budget",
        "mean uplink |cos|",
    ]
    table = [
        [
            r["method"],
            r["knob"],
            f"{r['final_accuracy_mean']:.2%} ± {r['final_accuracy_std']:.2%}"
            if math.isfinite(r["final_accuracy_mean"])
            else "- (no round fits)",
            "/".join(map(str, sorted(set(r["rounds_completed"]))))
            + (" (stopped)" if any(r["stopped_early"]) else ""),
            fmt_bytes(r["budget_spent"]),
            fmt_bytes(r["uplink_bytes"]),
            fmt_bytes(r["downlink_bytes"]),
            fmt_bytes(r["budget_planned_sum"]) if r["budget_total"] else "-",
            f"{r['budget_spent'] / budget:.1%}",
            f"{r['mean_uplink_cosine']:.3f}" if math.isfinite(r["mean_uplink_cosine"]) else "-",
        ]
        for r in rows
    ]

    def first_kb(values: list[Any]) -> str:
        text = " ".join(f"{x / 1e3:.1f}" if x is not None else "-" for x in values[:12])
        return text + (" ..." if len(values) > 12 else "")

    sched_headers = [
        "run (seed 0)",
        "n uplink per round",
        "n downlink per round",
        "planned kB (first rounds)",
        "spent kB (first rounds)",
        "overspent B",
    ]
    sched_table = [
        [
            r["method"],
            " ".join(map(str, r["n_uplink_per_round"])),
            " ".join(map(str, r["n_downlink_per_round"])),
            first_kb(r["planned_per_round"]),
            first_kb(r["spent_per_round"]),
            r["overspent"],
        ]
        for r in rows
        if r["method"].startswith("e3sfc")
    ]
    return Report(
        f"Equal total byte budget ({args['dataset']}/{args['model']})",
        intro=[
            f"Setting: {data['setting']}. Budget B = {budget:,} bytes (= E-3SFC's default run x "
            f"{args['budget_multiplier']:g}); knobs sized for at most {data['max_bytes_per_payload']:,} "
            "bytes per payload ((B - the messages' own fields) / (C (2R - 1))). Every budgeted run uses "
            "`budget-total-bytes = B` and `downlink = compressed` (its own compressor both ways) except "
            "the uplink-only 3SFC row. signSGD and FedAvg run at their fixed size until the budget is "
            "spent. QSGD's payload size depends on the data (entropy-coded levels, far below the bound "
            "a hard budget must reserve before sending), so its rows ran without a budget and are read "
            "at their last round within B ('cut at the budget'; its paper setting s = 16 and its fewest "
            "levels, s = 1). 'planned (sum)' is the sum of the scheduler's per-round allowances from "
            "summary.json['budget']."
        ],
        body=[
            Table(headers, table),
            "## Scheduler: samples per round, planned vs spent (seed 0)",
            Table(sched_headers, sched_table),
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    name = partial(results_name, "equal_budget")
    return run_script("equal_budget.py", parser(), measure, render, argv, name=name)


if __name__ == "__main__":
    main()
