"""Model matrix (issue 10): does E-3SFC learn on every model and federation, not only the MLP?

For each *cell* (dataset, model, federation) it runs, with the in-process loop and the
same seeds, FedAvg, E-3SFC as shipped (every default), and Top-k with error feedback
compressed both ways at exactly E-3SFC's payload bound (``topk-eq``: equal total bytes);
some cells add E-3SFC with one synthetic sample (``e3sfc-n1``) or with the conv presets'
``batch-min-cosine = 0.7`` (``e3sfc-c7``), and ``-float`` columns the same with the
correction's values in float16 (``correction-code = "float"``, the default before the
ternary code). It reports the mean accuracy over the last 5
rounds with its spread over seeds and the total bytes both ways (every message, catch-up
included).

Every run appends one JSON line to ``bench/results/model_matrix.jsonl`` as soon as it
ends, and runs already there are skipped, so a long matrix can be stopped and resumed,
and committed as it fills. ``--report`` renders ``bench/results/model_matrix.md`` from
the lines present (with the environment of the last measuring run, kept in
``model_matrix.json``)::

    .venv/bin/python bench/model_matrix.py --cells digits-mlp-a1,digits-convnet-a1 --workers 2
    .venv/bin/python bench/model_matrix.py --report

Cells not yet re-run on this code are shown from ``results/archive/`` (payload bytes only,
the columns of the same settings; the row says so). Goal per cell: E-3SFC at least 95% of
FedAvg's accuracy with at least 100x fewer total bytes, and above ``topk-eq``.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import parse_ints, run_federated
from bench.report import RESULTS, Report, Table, fmt_bytes, mean_std, read_jsonl, run_resumable

# the matrix as it stood at commit 3d966e3 (bytes of payloads only, many exploratory columns)
ARCHIVE = RESULTS / "archive" / "model_matrix_payload_bytes.jsonl"
LAST = 5
# every column's settings on top of the cell's; "e3sfc" is the shipped default (the
# correction's code chosen per payload), and each E-3SFC column has twins that pin it
SHIPPED: dict[str, dict[str, Any]] = {
    "e3sfc": {"method": "e3sfc"},
    "e3sfc-n1": {"method": "e3sfc", "synthetic-samples": 1},
    "e3sfc-c7": {"method": "e3sfc", "batch-min-cosine": 0.7},
}
CODES = {"float": {"correction-code": "float"}, "ternary": {"correction-code": "ternary"}}
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "fedavg": {"method": "fedavg"},
    **SHIPPED,
    **{
        f"e3sfc-{code}{name[5:]}": {**over, **pin}
        for code, pin in CODES.items()
        for name, over in SHIPPED.items()
    },
    "e3sfc-float-r110-c7": {
        "method": "e3sfc",
        "batch-min-cosine": 0.7,
        "payload-ratio": 110.0,
        **CODES["float"],
    },
}
# Top-k both ways at the payload bound of an E-3SFC column (same float width)
# baselines at the payload bound of an E-3SFC column, compressed both ways with error
# feedback on both sides: (method, the column whose bound it matches)
EQUAL_BYTES = {
    "topk-eq": ("topk", "e3sfc"),
    "topk-eq-r110": ("topk", "e3sfc-float-r110-c7"),
    "stc-eq": ("stc", "e3sfc"),
}
METHODS = (*METHOD_OVERRIDES, *EQUAL_BYTES)
# E-3SFC columns judged against the goal, each with its equal-bytes Top-k
CANDIDATES = {
    "e3sfc": "topk-eq",
    "e3sfc-n1": None,
    "e3sfc-c7": "topk-eq",
    "e3sfc-float": "topk-eq",
    "e3sfc-float-c7": "topk-eq",
    "e3sfc-ternary": "topk-eq",
    "e3sfc-ternary-c7": "topk-eq",
    "e3sfc-float-r110-c7": "topk-eq-r110",
}
# a column here -> the archived columns of the same settings, first found first: payload-ratio
# 160 was the default; where it does not bind (MLP, LeNet-5) the n2 columns ran it
ARCHIVED_AS = {
    "fedavg": ("fedavg",),
    "e3sfc-float": ("e3sfc-corr-r160", "e3sfc-corr-n2"),
    "topk-eq": ("topk-eq-corr-r160", "topk-eq-corr-n2"),
    "e3sfc-float-c7": ("e3sfc-corr-r160-c7",),
}
ALL_SAMPLED = {"num-partitions": 10, "dirichlet-alpha": 1.0, "fraction-train": 1.0}
HALF_SAMPLED = {"num-partitions": 20, "dirichlet-alpha": 0.1, "fraction-train": 0.5}
HEAVY = {"num-partitions": 5, "dirichlet-alpha": 1.0, "fraction-train": 1.0}
# the skewed, half-sampled federation at a size 2 cores can train: 10 clients, 5 per round
HEAVY_HALF = {"num-partitions": 10, "dirichlet-alpha": 0.1, "fraction-train": 0.5}
PAPER_TRAINING = {"lr": 0.01, "batch-size": 64}  # conf/*.toml: the paper's local training
BASE = ("fedavg", "e3sfc", "topk-eq", "e3sfc-float")
CONV = (*BASE, "e3sfc-c7", "e3sfc-float-c7")
N1 = ("e3sfc-n1", "e3sfc-float-n1")
LONG = ("fedavg", "e3sfc", "topk-eq", "stc-eq")


@dataclass(frozen=True)
class Cell:
    """One row of the matrix: a dataset, a model and a federation, shared by every method."""

    name: str
    dataset: str
    model: str
    federation: dict[str, Any]
    rounds: int
    extra: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = BASE

    def config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "num-rounds": self.rounds,
            **self.federation,
            **self.extra,
        }


CELLS = {
    c.name: c
    for c in [
        Cell("digits-mlp-a1", "digits", "mlp", ALL_SAMPLED, 30, methods=(*BASE, *N1)),
        Cell("digits-mlp-a0.1", "digits", "mlp", HALF_SAMPLED, 30, methods=(*BASE, *N1)),
        Cell("digits-mlp-default", "digits", "mlp", ALL_SAMPLED, 40, methods=("fedavg", "e3sfc")),
        Cell("digits-lenet5-a1", "digits", "lenet5", ALL_SAMPLED, 30, methods=(*BASE, *N1)),
        Cell("digits-lenet5-a0.1", "digits", "lenet5", HALF_SAMPLED, 30),
        Cell("mnist-mlp-a1", "mnist", "mlp", ALL_SAMPLED, 30, PAPER_TRAINING),
        Cell("mnist-lenet5-a1", "mnist", "lenet5", ALL_SAMPLED, 30, PAPER_TRAINING),
        Cell("digits-convnet-a1", "digits", "convnet", ALL_SAMPLED, 20, methods=CONV),
        Cell("digits-convnet-a0.1", "digits", "convnet", HALF_SAMPLED, 20, methods=CONV),
        Cell("mnist-convnet-a1", "mnist", "convnet", ALL_SAMPLED, 10, PAPER_TRAINING, methods=CONV),
        # the skewed cells again over a longer run (issue 10 measured the ConvNet over 40)
        Cell("digits-convnet-a0.1-r40", "digits", "convnet", HALF_SAMPLED, 40, methods=LONG),
        Cell("digits-lenet5-a0.1-r60", "digits", "lenet5", HALF_SAMPLED, 60, methods=LONG),
        Cell("digits-regnetx_200mf-a1", "digits", "regnetx_200mf", HEAVY, 8, PAPER_TRAINING),
        Cell("digits-vgg11-a1", "digits", "vgg11", HEAVY, 8, PAPER_TRAINING),
        Cell("digits-resnet18-a1", "digits", "resnet18", HEAVY, 8, PAPER_TRAINING),
        # the two heavy cells whose E-3SFC curves still climbed at round 8, run twice as long
        Cell("digits-regnetx_200mf-a1-r16", "digits", "regnetx_200mf", HEAVY, 16, PAPER_TRAINING),
        Cell("digits-vgg11-a1-r16", "digits", "vgg11", HEAVY, 16, PAPER_TRAINING),
        Cell("digits-regnetx_200mf-a0.1", "digits", "regnetx_200mf", HEAVY_HALF, 10, PAPER_TRAINING),
        Cell("digits-vgg11-a0.1", "digits", "vgg11", HEAVY_HALF, 10, PAPER_TRAINING),
        Cell("digits-resnet18-a0.1", "digits", "resnet18", HEAVY_HALF, 10, PAPER_TRAINING),
    ]
}


def _e3sfc_sizes(raw: dict[str, Any]) -> tuple[Any, Any, list[int], int]:
    """Config, dataset spec, parameter sizes and E-3SFC payload bound of a run config."""
    from e3sfc_core.compressor import Budget, build_compressor
    from e3sfc_core.config import ExperimentConfig
    from e3sfc_core.datasets import get_spec
    from e3sfc_core.models import build_model
    from e3sfc_core.synthetic_gradient import parameter_sizes

    cfg = ExperimentConfig.from_run_config({**raw, "method": "e3sfc"})
    spec = get_spec(cfg.dataset)
    model = build_model(cfg.model, tuple(spec.input_shape), spec.n_classes, cfg.seed)
    sizes = parameter_sizes(model)
    e3 = build_compressor("3sfc", cfg.compressor_settings(len(sizes)), spec)
    return cfg, spec, sizes, e3.encoded_size(sum(sizes), Budget(cfg.synthetic_samples))


def default_downlink(cell: Cell) -> str:
    """What ``downlink = "auto"`` does in this cell: relay (bundle of every sampled client's
    payload) when that is at most ``relay-max-fraction`` of the dense weights."""
    from e3sfc_core.payload import bundle_size, dense_size

    cfg, _, sizes, payload = _e3sfc_sizes(cell.config())
    sampled = max(cfg.min_train_nodes, round(cfg.fraction_train * cfg.num_partitions))
    relay = cfg.relays(bundle_size([payload] * sampled), dense_size(sum(sizes)))
    return "relay" if relay else "3SFC"


def equal_bytes_ratio(method: str, raw: dict[str, Any]) -> float:
    """The ratio of Top-k or STC (``method``) whose payload is as large as E-3SFC's
    (``len(encode)`` of both)."""
    from e3sfc_core.baselines import TopKCompressor
    from e3sfc_core.compressor import build_compressor

    cfg, spec, sizes, target = _e3sfc_sizes(raw)
    numel = sum(sizes)
    sparse = build_compressor(method, cfg.compressor_settings(len(sizes)), spec)
    assert isinstance(sparse, TopKCompressor)  # STC is one too
    k = max(1, sparse.k_for_bytes(numel, target))  # its payload never exceeds E-3SFC's
    return (k + 0.5) / numel


def method_overrides(method: str, base: dict[str, Any]) -> dict[str, Any]:
    if method in EQUAL_BYTES:
        baseline, column = EQUAL_BYTES[method]
        matched = {**base, **METHOD_OVERRIDES[column]}
        # Top-k's values in E-3SFC's float width (float16 = "auto" means float32 for Top-k)
        return {
            **matched,
            "method": baseline,
            "downlink": "compressed",
            "float16": True,
            "topk-ratio": equal_bytes_ratio(baseline, matched),
        }
    return METHOD_OVERRIDES[method]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One run; returns the JSON line (accuracy over the last rounds, bytes, cosines)."""
    raw = {
        **job["config"],
        "seed": job["seed"],
        "num-threads": 1,
        "device": "cpu",
        "output-dir": str(Path(job["runs"]) / job["cell"]),
        "run-name": f"{job['method']}-s{job['seed']}",
    }
    raw.update(method_overrides(job["method"], raw))
    out = run_federated(raw)
    recs = out["records"]
    acc = [r["accuracy"] for r in recs]
    last = recs[-1] if recs else {}
    return {
        "cell": job["cell"],
        "method": job["method"],
        "seed": job["seed"],
        "config": raw,
        "rounds_run": len(recs),
        "acc_last5": mean_std(acc[-LAST:])[0],
        "acc_final": acc[-1] if acc else float("nan"),
        "acc_curve": acc,
        "uplink_bytes": last.get("cum_uplink_bytes", 0),
        "downlink_bytes": last.get("cum_downlink_bytes", 0),
        "mean_cosine": mean_std([r["mean_cosine"] for r in recs])[0],
        # share of accepted uplink payloads that carried a synthetic batch (corrected 3SFC)
        "batch_share": sum(r.get("uplink_batches", 0) for r in recs)
        / max(1, sum(r["accepted"] for r in recs)),
        "wall_seconds": out["wall_seconds"],
    }


def measure(args: argparse.Namespace, jsonl: Path) -> None:
    """Run what is missing, appending each run to the JSONL file as it ends; no
    ``--methods`` means each cell's own list."""
    cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; known: {list(CELLS)}")
    methods = [m for m in args.methods.split(",") if m] or None
    have = {(r["cell"], r["method"], int(r["seed"])) for r in read_jsonl(jsonl)}
    runs = str(RESULTS / "runs" / args.out_name)
    jobs = [
        {"cell": c, "method": m, "seed": s, "config": CELLS[c].config(), "runs": runs}
        for c in cells
        for s in parse_ints(args.seeds)
        for m in (methods or CELLS[c].methods)
        if (c, m, s) not in have
    ]
    print(f"{len(jobs)} runs to do ({len(have)} already in {jsonl.name})", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for row in pool.map(run_one, jobs):
            with jsonl.open("a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            total = fmt_bytes(row["uplink_bytes"] + row["downlink_bytes"])
            print(
                f"{row['cell']} {row['method']} s{row['seed']}: {row['acc_last5']:.4f}, {total}", flush=True
            )


def _acc(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "-"
    m, s = mean_std([100 * r["acc_last5"] for r in rows])
    return f"{m:.1f}% ± {s:.1f} ({len(rows)})"


def _mean_acc(rows: list[dict[str, Any]]) -> float:
    return mean_std([r["acc_last5"] for r in rows])[0]


def _bytes(rows: list[dict[str, Any]]) -> float:
    return mean_std([r["uplink_bytes"] + r["downlink_bytes"] for r in rows])[0] if rows else float("nan")


def _swing(rows: list[dict[str, Any]]) -> str:
    """Largest round-to-round accuracy change over the last 10 rounds (points), worst seed."""
    worst = [
        max(abs(a - b) for a, b in zip(c[-10:], c[-9:], strict=False))
        for c in (r["acc_curve"] for r in rows)
        if len(c) > 1
    ]
    return f"{100 * max(worst):.1f}" if worst else "-"


def byte_goal(cell: Cell) -> float:
    """100x, or a quarter of what one synthetic sample per payload would save where one
    sample is a large share of the model (dense payload / n = 1 float32 payload, per
    message, as the paper sends it)."""
    from e3sfc_core.payload import dense_size

    _, _, sizes, one = _e3sfc_sizes(
        {**cell.config(), "synthetic-samples": 1, "correction-share": 0.0, "float16": False}
    )
    return min(100.0, dense_size(sum(sizes)) / one / 4)


def verdict(by_method: dict[str, list[dict[str, Any]]], method: str, needed: float) -> list[str]:
    """``method`` against the goal: [bytes, ratio, % of FedAvg, Top-k and STC at equal
    bytes, verdict]."""
    fed, mine = by_method["fedavg"], by_method[method]
    rival = CANDIDATES[method]
    eq = by_method[rival] if rival else []
    if not fed or not mine:
        return ["-"] * 6
    acc_ratio = _mean_acc(mine) / _mean_acc(fed)
    byte_ratio = _bytes(fed) / _bytes(mine)
    parts = [
        "accuracy ok" if acc_ratio >= 0.95 else "accuracy SHORT",
        "bytes ok" if byte_ratio >= needed else f"bytes SHORT (goal {needed:.0f}x)",
    ]
    if eq and abs(_bytes(eq) / _bytes(mine) - 1.0) > 0.1:
        parts.append(f"{rival} not at equal bytes")
    elif eq:
        parts.append(f"beats {rival}" if _mean_acc(mine) > _mean_acc(eq) else f"LOSES to {rival}")
    stc = by_method["stc-eq"] if rival == "topk-eq" else []
    if stc and abs(_bytes(stc) / _bytes(mine) - 1.0) <= 0.1:
        parts.append("beats stc-eq" if _mean_acc(mine) > _mean_acc(stc) else "LOSES to stc-eq")
    return [
        fmt_bytes(_bytes(mine)),
        f"{byte_ratio:.0f}x",
        f"{100 * acc_ratio:.0f}%",
        _acc(eq) if rival else "-",
        _acc(stc),
        "; ".join(parts),
    ]


def cell_rows(
    name: str, current: list[dict[str, Any]], archived: list[dict[str, Any]]
) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """Each column's runs of a cell, and what they count: this code's runs, and for a
    column with none the archived runs of the same settings (payload bytes only)."""
    by_method = {m: [r for r in current if r["cell"] == name and r["method"] == m] for m in METHODS}
    old = [r for r in archived if r["cell"] == name]
    from_archive = []
    for column, sources in ARCHIVED_AS.items():
        if by_method[column]:
            continue
        found = ([r for r in old if r["method"] == source] for source in sources)
        by_method[column] = next((runs for runs in found if runs), [])
        if by_method[column]:
            from_archive.append(column)
    if not from_archive:
        return by_method, "messages"
    if len(from_archive) == sum(1 for runs in by_method.values() if runs):
        return by_method, "payloads (archive)"
    return by_method, f"messages; payloads (archive): {', '.join(from_archive)}"


def federation_text(cell: Cell) -> str:
    f = cell.federation
    sampled = "all" if f["fraction-train"] == 1.0 else f"{f['fraction-train']:g} of them"
    clients = f"{f['num-partitions']} clients, {sampled} per round"
    text = f"alpha {f['dirichlet-alpha']}, {clients}, {cell.rounds} rounds"
    extra = ", ".join(f"{k} {v}" for k, v in cell.extra.items())
    return text + (f", {extra}" if extra else "")


def load(current: list[dict[str, Any]]) -> dict[str, Any]:
    """What the report is made from: each cell with runs, its runs per column and what it
    states about the cell (federation, bytes counted, auto downlink, byte goal)."""
    archived = read_jsonl(ARCHIVE)
    cells = []
    for name, cell in CELLS.items():
        runs, counted = cell_rows(name, current, archived)
        if any(runs.values()):
            facts = {"federation": federation_text(cell), "counted": counted, "byte_goal": byte_goal(cell)}
            cells.append({"name": name, **facts, "downlink": default_downlink(cell), "runs": runs})
    return {"cells": cells}


def render(data: dict[str, Any]) -> Report:
    acc_table, goal_table = [], []
    for c in data["cells"]:
        runs = c["runs"]
        acc_table.append(
            [c["name"], c["federation"], c["counted"], c["downlink"]]
            + [_acc(runs[m]) for m in METHODS]
            + [fmt_bytes(_bytes(runs["fedavg"])), _swing(runs["fedavg"])]
        )
        goal_table += [
            [c["name"], m, _acc(runs[m]), *verdict(runs, m, c["byte_goal"]), _swing(runs[m])]
            for m in CANDIDATES
            if runs[m]
        ]
    acc_headers = ["cell", "federation", "bytes counted", "auto downlink", *(f"{m} acc" for m in METHODS)]
    acc_headers += ["FedAvg bytes", "FedAvg swing"]
    goal_headers = ["cell", "E-3SFC column", "acc", "total bytes", "fewer bytes than FedAvg"]
    goal_headers += ["of FedAvg's acc", "Top-k at equal bytes", "STC at equal bytes", "verdict", "swing"]
    return Report(
        "Model matrix: FedAvg, Top-k + EF and E-3SFC on every model",
        intro=[
            "In-process loop (`e3sfc_core.simulate.run_reference`), CPU, one torch thread per run, "
            "no norm clipping. "
            f"Accuracy: mean over the last {LAST} rounds, then mean ± standard deviation over seeds "
            "(number of seeds in brackets). Bytes: total uplink + downlink of a run, mean over seeds, "
            "`len()` of every encoded message (instruction fields 34 B + 4 B per payload, reply "
            "fields 41 B, plus the payloads; catch-up included). `e3sfc` is E-3SFC as shipped: "
            "2 float16 samples and a sparse correction (the largest entries of what they miss) in "
            "3/4 of a payload of at least 1/160 of the dense float32 update, 3SFC on the downlink "
            'where `downlink = "auto"` picks it; the correction\'s code chosen per payload '
            '(`correction-code = "auto"`: ternary, i.e. positions, a sign each and one magnitude '
            "as STC sends them, or float16 values, whichever leaves the smaller residual); "
            "`-ternary` pins the ternary code; `-float` the correction's values in float16 instead "
            '(`correction-code = "float"`, the default before the ternary code; those rows ran '
            "before the key existed, with that behaviour); "
            "`-n1` one sample, `-c7` with `batch-min-cosine = 0.7` (the conv presets), "
            "`-r110-c7` the same with a payload of at least 1/110. `topk-eq` is Top-k with error "
            "feedback on both sides, compressed both ways, keeping as many float16 values (Rice- or "
            "bitmap-coded positions) as fit in `e3sfc`'s payload bound, so its bytes equal that "
            "column's (the ternary and the float code have the same bound within 8 bytes; rows "
            "measured before the ternary code were sized to the float one); `topk-eq-r110` likewise "
            "for `e3sfc-float-r110-c7`. 'bytes counted': `messages` "
            "rows ran on this code; `payloads (archive)` rows are the same settings' runs from "
            "`archive/model_matrix_payload_bytes.jsonl` (commit 3d966e3 and before: payload bytes "
            "only; the messages' fields add 34-41 B per message, for every method alike; a short "
            "ConvNet run ends on the same weights then and now), for cells too slow to re-run here. "
            "Training defaults unless the federation column says otherwise: 5 local epochs, lr "
            "0.05, batch 32. Heavy cells (RegNetX, VGG-11, ResNet-18; 2 CPU cores): 1 seed (the "
            "seeds column says where more ran), all sampled with 5 clients and 8 rounds (`-r16`: "
            "RegNetX and VGG-11 over 16), skewed with "
            "10 clients (5 per round) and 10 rounds. `-r40`, `-r60`: the skewed ConvNet and LeNet-5 "
            "cells over 40 and 60 rounds (issue 10 measured the ConvNet over 40). The byte goal "
            "is 100x, or a quarter of the n = 1 ratio where one synthetic sample is a large share "
            "of the model. 'swing': the largest round-to-round change of accuracy over the last 10 "
            "rounds, in points, worst seed."
        ],
        body=[
            "## Accuracy",
            Table(acc_headers, acc_table),
            "## E-3SFC against the goal (>= 95% of FedAvg, >= 100x fewer bytes, beats Top-k at equal bytes)",
            Table(goal_headers, goal_table),
        ],
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from: {', '.join(CELLS)}")
    p.add_argument("--methods", default="", help=f"subset of {', '.join(METHODS)} (default: each cell's)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out-name", default="model_matrix", help="results/NAME.{jsonl,json,md}, runs/NAME/")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_resumable("model_matrix.py", parser(), measure, load, render, argv)


if __name__ == "__main__":
    main()
