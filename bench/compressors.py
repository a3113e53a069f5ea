"""Compressor benchmark (issue #2): bytes, cosine and time of every method on real updates.

Command (digits/MLP, CPU, about 3 minutes on 2 cores)::

    .venv/bin/python bench/compressors.py

Quick smoke run::

    .venv/bin/python bench/compressors.py --rounds 1,2 --clients 0,1 --samples 1,4 --eval-sweep 5,20 \
        --out-name /tmp/compressors_smoke

What it does

1. Runs FedAvg on ``--dataset/--model`` (default digits/MLP, 10 clients, Dirichlet 1.0,
   5 local epochs) for ``max(--rounds)`` rounds, every client training exactly as
   ``client_round`` trains it, and keeps the local updates of ``--clients`` in
   ``--rounds`` as compression targets, with the local-training seconds of each update.
2. Compresses every target with every method at the target's base weights, going
   through the same steps as ``rounds.compress_update``: compress -> encode -> decode ->
   decompress. Reports bytes per update (``len(encode(payload))``), |cosine| between
   what the receiver reconstructs and the target, seconds of ``compress`` and of the
   whole round trip (encode, decode, decompress timed separately too), and the ratio of
   compression seconds to the local-training seconds of the same client and round.
3. 3SFC vs Top-k **at equal bytes**: for each n in ``--samples`` Top-k keeps the largest
   ``k`` whose payload is certain to fit in the 3SFC payload's bytes
   (``TopKCompressor.k_for_bytes``: positions are Rice-coded, format v3, so the bound is
   ``encoded_size``'s upper bound and the real payload is a little smaller); STC likewise.
4. Cosine vs number of closure evaluations (each a double backward): ``max-evals`` in
   ``--eval-sweep`` with ``min-improvement = 0`` (only the cap stops the search), a
   200-evaluation reference (the authors' budget), and the project default (at most 20
   evaluations, stop when |cos| improves < 1e-3 over 5 evaluations).

Goals checked (printed and written as pass/fail):

* 3SFC |cosine| at equal bytes >= 1.3x Top-k's (mean over targets, every n).
* 3SFC compression seconds <= 2x the local-training seconds of the same round (median
  over targets, for the default n = the config's ``synthetic-samples``, 2).

Targets are raw local updates (no error-feedback residual), i.e. what a client
compresses in its first round. Outputs: ``bench/results/<--out-name>.{json,md}`` (default
``compressors``); ``--report`` re-renders the markdown from the JSON without measuring.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from typing import Any

import torch

from bench.common import (
    REPO,
    add_setting_args,
    client_settings,
    collect_targets,
    fedavg_targets_config,
    parse_ints,
    retime_training,
    set_threads,
    timed_roundtrip,
    uplink_meta,
)
from bench.report import Report, Table, env_info, mean_std, median, run_script
from e3sfc_core.baselines import TopKCompressor, topk_count
from e3sfc_core.compressor import Budget, CompressorSettings, PayloadMeta, build_compressor
from e3sfc_core.datasets import get_spec
from e3sfc_core.models import build_model
from e3sfc_core.payload import dense_size
from e3sfc_core.synthetic_gradient import parameter_sizes
from e3sfc_core.tensors import cosine, num_params, set_flat
from e3sfc_core.training import resolve_device

GOAL_COS_RATIO = 1.3
GOAL_TIME_RATIO = 2.0
REFERENCE_EVALS = 200


def k_for_bytes(name: str, settings: CompressorSettings, spec: Any, numel: int, nbytes: int) -> int:
    """Largest k (at least 1) whose Top-k or STC payload cannot exceed ``nbytes``."""
    comp = build_compressor(name, settings, spec)
    assert isinstance(comp, TopKCompressor), name
    return max(1, comp.k_for_bytes(numel, nbytes))


def ratio_for_k(k: int, numel: int) -> float:
    """A ``topk-ratio`` that makes ``topk_count`` keep exactly ``k`` of ``numel``."""
    ratio = k / numel
    assert topk_count(ratio, numel) == k, (k, numel, ratio)
    return ratio


def run_one(
    name: str,
    settings: CompressorSettings,
    spec: Any,
    target: torch.Tensor,
    model: torch.nn.Module,
    meta: PayloadMeta,
    n: int,
    device: torch.device,
) -> dict[str, Any]:
    """compress -> encode -> decode -> decompress, as ``rounds.compress_update``, timed per step."""
    comp = build_compressor(name, settings, spec)
    rt = timed_roundtrip(comp, target, model, meta, n, device)
    stats = rt["stats"]
    assert len(rt["blob"]) <= comp.encoded_size(target.numel(), Budget(n)), name
    return {
        "bytes": len(rt["blob"]),
        "cosine": abs(cosine(rt["transmitted"], target)),
        "compress_s": stats.seconds,
        "encode_s": rt["encode"].seconds,
        "decode_s": rt["decode"].seconds,
        "decompress_s": rt["decompress"].seconds,
        "roundtrip_s": rt["total"].seconds,
        "evals": stats.evaluations,
        "degenerate": stats.degenerate,
        "wall_compress_s": rt["compress"].seconds,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_args(p, federated=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds", default="1,5,10", help="rounds whose updates are targets (FedAvg runs to the max)"
    )
    p.add_argument("--clients", default="0,1,2,3", help="partitions whose updates are targets")
    p.add_argument("--samples", default="1,2,4,8", help="3SFC n values (Top-k matched to each)")
    p.add_argument("--eval-sweep", default="5,10,20,40,80", help="max-evals values")
    p.add_argument("--sweep-samples", default="1,4", help="n values for the evaluations sweep")
    p.add_argument("--no-reference", action="store_true", help="skip the 200-evaluation reference")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--out-name", default="compressors")
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    device = resolve_device(args.device)
    cfg = fedavg_targets_config(args, args.device)
    spec = get_spec(args.dataset)
    rounds, clients = parse_ints(args.rounds), parse_ints(args.clients)
    samples, sweep_n = parse_ints(args.samples), parse_ints(args.sweep_samples)
    n_default = cfg.synthetic_samples

    t0 = time.perf_counter()
    targets, fedavg_log = collect_targets(cfg, rounds, clients, device, REPO)
    print(
        f"collected {len(targets)} targets in {time.perf_counter() - t0:.1f}s "
        f"(FedAvg accuracy after round {fedavg_log[-1]['round']}: {fedavg_log[-1]['accuracy']:.3f})"
    )

    model = build_model(cfg.model, tuple(spec.input_shape), spec.n_classes, cfg.seed).to(device)
    numel = num_params(model)
    layers = len(parameter_sizes(model))  # sizes 3SFC payloads with per-layer scales
    s3 = build_compressor("3sfc", cfg.compressor_settings(layers), spec)
    sfc_bytes = {n: s3.encoded_size(numel, Budget(n)) for n in samples}

    # (label, registry name, settings overrides, n, group)
    methods: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("fedavg", "fedavg", {}, 1, "baseline"),
        (f"topk r={cfg.topk_ratio:g}", "topk", {}, 1, "baseline"),
        (f"stc r={cfg.topk_ratio:g}", "stc", {}, 1, "baseline"),
        ("signsgd", "signsgd", {}, 1, "baseline"),
        (f"qsgd s={cfg.qsgd_levels}", "qsgd", {}, 1, "baseline"),
    ]
    eq_k: dict[int, tuple[int, int]] = {}  # n -> (Top-k's k, STC's k) at 3SFC's bytes
    for n in samples:
        settings = cfg.compressor_settings(layers)
        kt = k_for_bytes("topk", settings, spec, numel, sfc_bytes[n])
        ks = k_for_bytes("stc", settings, spec, numel, sfc_bytes[n])
        eq_k[n] = kt, ks
        methods += [
            (f"3sfc n={n}", "3sfc", {}, n, f"eq{n}"),
            (f"topk@eq n={n} (k={kt})", "topk", {"topk_ratio": ratio_for_k(kt, numel)}, 1, f"eq{n}"),
            (f"stc@eq n={n} (k={ks})", "stc", {"topk_ratio": ratio_for_k(ks, numel)}, 1, f"eq{n}"),
        ]
    sweep_settings: list[tuple[str, int, dict[str, Any]]] = []
    for n in sweep_n:
        for m in parse_ints(args.eval_sweep):
            sweep_settings.append((f"cap {m}", n, {"max_evals": m, "min_improvement": 0.0}))
        sweep_settings.append(("default (20, stall 5 / 1e-3)", n, {}))
        if not args.no_reference:
            ref = {"max_evals": REFERENCE_EVALS, "min_improvement": 0.0}
            sweep_settings.append((f"cap {REFERENCE_EVALS} (authors' budget)", n, ref))

    results: dict[str, list[dict[str, Any]]] = {m[0]: [] for m in methods}
    sweep_results: dict[tuple[str, int], list[dict[str, Any]]] = {(s[0], s[1]): [] for s in sweep_settings}
    warm = True
    train_s: list[float] = []  # local training re-timed next to each target's compressions
    for i, tgt in enumerate(targets):
        set_flat(model, tgt.base.to(device))
        model.eval()
        meta = uplink_meta(tgt)
        base_settings = client_settings(cfg, tgt.partition_id, layer_count=layers)
        target = tgt.update.to(device)
        if warm:  # first call pays one-off lazy initialisation; keep it out of the timings
            run_one("3sfc", base_settings, spec, target, model, meta, 1, device)
            warm = False
        train_s.append(retime_training(cfg, tgt, device))
        for label, name, over, n, _ in methods:
            row = run_one(name, replace(base_settings, **over), spec, target, model, meta, n, device)
            row.update(round=tgt.server_round, client=tgt.partition_id, train_s=train_s[-1])
            results[label].append(row)
        for label, n, over in sweep_settings:
            row = run_one("3sfc", replace(base_settings, **over), spec, target, model, meta, n, device)
            sweep_results[(label, n)].append(row)
        print(
            f"target {i + 1}/{len(targets)} (round {tgt.server_round}, client {tgt.partition_id}, "
            f"train {train_s[-1] * 1e3:.1f} ms): 3sfc n={samples[0]} cos "
            f"{results[f'3sfc n={samples[0]}'][-1]['cosine']:.3f}"
        )

    json_rows = []
    for label, name, _, n, group in methods:
        rows = results[label]
        cos_m, cos_s = mean_std([r["cosine"] for r in rows])
        json_rows.append(
            {
                "method": label,
                "registry": name,
                "group": group,
                "n": n if name == "3sfc" else None,
                "bytes": rows[0]["bytes"],
                "cosine_mean": cos_m,
                "cosine_std": cos_s,
                "compress_s_median": median([r["compress_s"] for r in rows]),
                "roundtrip_s_median": median([r["roundtrip_s"] for r in rows]),
                "encode_s_median": median([r["encode_s"] for r in rows]),
                "decode_s_median": median([r["decode_s"] for r in rows]),
                "decompress_s_median": median([r["decompress_s"] for r in rows]),
                "evals_mean": mean_std([r["evals"] for r in rows])[0],
                "compress_over_train_median": median([r["compress_s"] / r["train_s"] for r in rows]),
                "degenerate": sum(bool(r["degenerate"]) for r in rows),
            }
        )

    # ---- goal 1: equal bytes
    eq_json, goal1 = [], True
    by_label = {r["method"]: r for r in json_rows}
    for n in samples:
        kt, ks = eq_k[n]
        a = by_label[f"3sfc n={n}"]
        b = by_label[f"topk@eq n={n} (k={kt})"]
        c = by_label[f"stc@eq n={n} (k={ks})"]
        ratio = a["cosine_mean"] / b["cosine_mean"] if b["cosine_mean"] > 0 else math.inf
        # per-target ratio too: how often does 3SFC win on a single update
        wins = sum(
            x["cosine"] > y["cosine"] for x, y in zip(results[a["method"]], results[b["method"]], strict=True)
        )
        ok = ratio >= GOAL_COS_RATIO
        goal1 &= ok
        eq_json.append(
            {
                "n": n,
                "bytes_3sfc": a["bytes"],
                "bytes_topk": b["bytes"],
                "k_topk": kt,
                "bytes_stc": c["bytes"],
                "cos_3sfc": a["cosine_mean"],
                "cos_topk": b["cosine_mean"],
                "cos_stc": c["cosine_mean"],
                "ratio": ratio,
                "wins": wins,
                "targets": len(targets),
                "pass": ok,
            }
        )

    # ---- goal 2: compression time vs local training time
    time_json = []
    goal2 = None
    for n in samples:
        rows = results[f"3sfc n={n}"]
        ratios = [r["compress_s"] / r["train_s"] for r in rows]
        med = median(ratios)
        ok = med <= GOAL_TIME_RATIO
        if n == n_default:
            goal2 = ok
        time_json.append(
            {
                "n": n,
                "compress_s_median": median([r["compress_s"] for r in rows]),
                "train_s_median": median(train_s),
                "ratio_median": med,
                "ratio_max": max(ratios),
                "roundtrip_ratio_median": median([r["roundtrip_s"] / r["train_s"] for r in rows]),
                "share_within_goal": sum(x <= GOAL_TIME_RATIO for x in ratios) / len(ratios),
                "pass": ok,
            }
        )
    if goal2 is None:
        goal2 = all(t["pass"] for t in time_json)

    # ---- evaluations sweep
    sw_json = []
    for n in sweep_n:
        ref_key = (f"cap {REFERENCE_EVALS} (authors' budget)", n)
        ref_rows = sweep_results.get(ref_key)
        ref = mean_std([r["cosine"] for r in ref_rows])[0] if ref_rows is not None else math.nan
        for label, nn, _ in sweep_settings:
            if nn != n:
                continue
            rows = sweep_results[(label, n)]
            cm, cs = mean_std([r["cosine"] for r in rows])
            sw_json.append(
                {
                    "n": n,
                    "setting": label,
                    "cosine_mean": cm,
                    "cosine_std": cs,
                    "fraction_of_reference": cm / ref if ref and math.isfinite(ref) else math.nan,
                    "evals_mean": mean_std([r["evals"] for r in rows])[0],
                    "compress_s_median": median([r["compress_s"] for r in rows]),
                }
            )

    setting = (
        f"{args.dataset}/{args.model} ({numel:,} weights), {args.num_partitions} clients, Dirichlet "
        f"{cfg.dirichlet_alpha}, {args.local_epochs} local epochs, batch {cfg.batch_size}, lr "
        f"{cfg.lr}; targets: "
        f"local updates of clients {clients} in FedAvg rounds {rounds} ({len(targets)} targets, no residual)"
    )
    return {
        "env": env_info(device),
        "args": vars(args),
        "setting": setting,
        "numel": numel,
        "dense_bytes": dense_size(numel),
        "n_default": n_default,
        "fedavg_trajectory": fedavg_log,
        "train_seconds": train_s,
        "methods": json_rows,
        "equal_bytes": eq_json,
        "time_vs_train": time_json,
        "lbfgs_sweep": sw_json,
        "goals": {"cos_ratio_ge_1.3": goal1, "compress_le_2x_train": goal2},
        "per_target": results,
        "per_target_sweep": {f"{k[0]} n={k[1]}": v for k, v in sweep_results.items()},
    }


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render(data: dict[str, Any]) -> Report:
    methods = Table(
        ["method", "bytes/update", "vs dense", "|cos| mean ± std", "compress ms (median)",
         "round trip ms (median)", "compress / train", "evals"],
        [
            [
                r["method"],
                r["bytes"],
                f"{data['dense_bytes'] / r['bytes']:.0f}x",
                f"{r['cosine_mean']:.3f} ± {r['cosine_std']:.3f}",
                f"{r['compress_s_median'] * 1e3:.2f}",
                f"{r['roundtrip_s_median'] * 1e3:.2f}",
                f"{r['compress_over_train_median']:.2f}",
                f"{r['evals_mean']:.0f}" if r["registry"] == "3sfc" else "-",
            ]
            for r in data["methods"]
        ],
    )
    equal = Table(
        ["n", "3SFC bytes", "Top-k bytes", "3SFC |cos|", "Top-k |cos|", "STC@eq |cos|", "3SFC / Top-k",
         "3SFC wins (per target)", f">= {GOAL_COS_RATIO}x"],
        [
            [
                e["n"],
                e["bytes_3sfc"],
                f"{e['bytes_topk']} (k={e['k_topk']})",
                f"{e['cos_3sfc']:.3f}",
                f"{e['cos_topk']:.3f}",
                f"{e['cos_stc']:.3f}",
                f"{e['ratio']:.2f}x",
                f"{e['wins']}/{e['targets']}",
                _verdict(e["pass"]),
            ]
            for e in data["equal_bytes"]
        ],
    )
    timing = Table(
        ["n", "3SFC compress ms", "local train ms", "compress / train (median)", "round trip / train",
         "targets within 2x", f"<= {GOAL_TIME_RATIO}x"],
        [
            [
                t["n"],
                f"{t['compress_s_median'] * 1e3:.1f}",
                f"{t['train_s_median'] * 1e3:.1f}",
                f"{t['ratio_median']:.2f}",
                f"{t['roundtrip_ratio_median']:.2f}",
                f"{t['share_within_goal']:.0%}",
                _verdict(t["pass"]),
            ]
            for t in data["time_vs_train"]
        ],
    )
    sweep = Table(
        ["n", "search setting", "evals (mean)", "|cos| mean ± std", f"of {REFERENCE_EVALS}-eval |cos|",
         "compress ms (median)"],
        [
            [
                s["n"],
                s["setting"],
                f"{s['evals_mean']:.1f}",
                f"{s['cosine_mean']:.3f} ± {s['cosine_std']:.3f}",
                f"{s['fraction_of_reference']:.1%}" if math.isfinite(s["fraction_of_reference"]) else "-",
                f"{s['compress_s_median'] * 1e3:.1f}",
            ]
            for s in data["lbfgs_sweep"]
        ],
    )
    goals = data["goals"]
    return Report(
        "Compressors on real updates (issue #2)",
        intro=[f"Setting: {data['setting']}."],
        body=[
            "## Every method",
            "Bytes are `len(encode(payload))`; |cos| is between the decoded, decompressed update and the "
            "target; `compress / train` is the compression seconds over the local-training seconds of the "
            "same client and round (median over targets). Round trip = compress + encode + decode + "
            "decompress.",
            methods,
            "## 3SFC vs Top-k at equal bytes",
            "Top-k keeps the largest k whose payload (float32 values, Rice-coded positions, format v3) "
            "cannot exceed 3SFC's bytes (`TopKCompressor.k_for_bytes`); STC@eq likewise.",
            equal,
            f"**Goal 1, 3SFC |cos| >= {GOAL_COS_RATIO}x Top-k's at equal bytes (every n): "
            f"{_verdict(goals['cos_ratio_ge_1.3'])}.**",
            "## Compression time vs local training time",
            timing,
            f"**Goal 2, 3SFC compression <= {GOAL_TIME_RATIO}x local training of the same round "
            f"(default n={data['n_default']}, median): {_verdict(goals['compress_le_2x_train'])}.**",
            "## |cos| vs closure evaluations",
            "`cap m`: max-evals m, min-improvement 0 (only the cap stops the search; the cap is exact). "
            "`default`: the shipped early stop.",
            sweep,
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("compressors.py", parser(), measure, render, argv)


if __name__ == "__main__":
    main()
