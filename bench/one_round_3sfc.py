"""One round under the microscope: how much of FedAvg's progress does a 3SFC round keep?

All clients train one round from the same initial weights (as ``client_round`` trains
them); each update is compressed with 3SFC (no residual yet) and reconstructed as the
server does. It reports the clients' mean |cosine|, the cosine between the aggregated
reconstructions and the true mean update, and the test loss and accuracy after applying
the true mean (FedAvg), the aggregated reconstructions, and multiples of them. This
separates the two ways a round can fall short: a *shorter* step (fixable by a larger
step or by error feedback) and a step whose error points somewhere harmful (not fixable
by scaling: a larger multiple of the aggregate then *raises* the loss).

    .venv/bin/python bench/one_round_3sfc.py --model convnet --samples 4,16
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import (
    REPO,
    add_setting_args,
    env_info,
    md_table,
    parse_ints,
    report_head,
    set_threads,
    write_results,
)

SCRIPT = "one_round_3sfc.py"
MULTIPLES = (1.0, 2.0, 3.0)


def main(argv: list[str] | None = None) -> None:
    from e3sfc_core.client import client_compressor, client_data
    from e3sfc_core.compressor import Budget, PayloadMeta
    from e3sfc_core.config import ExperimentConfig
    from e3sfc_core.datasets import load_dataset
    from e3sfc_core.experiment import resolve_path
    from e3sfc_core.models import build_model
    from e3sfc_core.payload import Direction
    from e3sfc_core.rounds import compress_update
    from e3sfc_core.synthetic_gradient import parameter_sizes
    from e3sfc_core.tensors import cosine, digest_flat, get_flat, set_flat
    from e3sfc_core.training import evaluate, train_local

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_args(p, federated=False)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--samples", default="4", help="3SFC n values")
    p.add_argument("--scale-modes", default="global,layer")
    p.add_argument("--max-evals", default="", help="search caps to compare (default: the config's)")
    p.add_argument("--after-rounds", type=int, default=0, help="FedAvg rounds to run before measuring")
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="also: the true mean with one tensor swapped for its reconstruction",
    )
    p.add_argument("--out-name", default="")
    args = p.parse_args(argv)
    set_threads(1)
    cpu = torch.device("cpu")
    base_cfg = ExperimentConfig.from_run_config(
        {
            "dataset": args.dataset,
            "model": args.model,
            "num-partitions": args.num_partitions,
            "local-epochs": args.local_epochs,
            "lr": args.lr,
            "data-root": args.data_root,
        }
    )
    root = resolve_path(args.data_root, REPO)
    _, test, spec = load_dataset(args.dataset, root, False)
    model = build_model(base_cfg.model, tuple(spec.input_shape), spec.n_classes, base_cfg.seed)
    w0 = get_flat(model)
    datasets = [client_data(base_cfg, pid, args.num_partitions, root) for pid in range(args.num_partitions)]
    weights = [float(len(d)) for d in datasets]
    total = sum(weights)

    def fedavg_round(seed_offset: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        ups = []
        for pid, data in enumerate(datasets):
            set_flat(model, w0)
            train_local(
                model,
                data,
                epochs=base_cfg.local_epochs,
                lr=base_cfg.lr,
                batch_size=base_cfg.batch_size,
                device=cpu,
                seed=pid + 1 + seed_offset,
            )
            ups.append(get_flat(model) - w0)
        avg = sum(u * (w / total) for u, w in zip(ups, weights, strict=True))
        assert isinstance(avg, torch.Tensor)
        return ups, avg

    for r in range(args.after_rounds):
        w0 = w0 + fedavg_round(1000 * (r + 1))[1]
    updates, mean = fedavg_round(0)
    set_flat(model, w0)
    model.eval()

    def after(step: torch.Tensor) -> tuple[float, float]:
        set_flat(model, w0 + step)
        result = evaluate(model, test, device=cpu)
        set_flat(model, w0)
        model.eval()
        return result

    def cell(result: tuple[float, float]) -> str:
        return f"{result[0]:.3f} / {100 * result[1]:.1f}%"

    meta = PayloadMeta(Direction.UPLINK, 1 + args.after_rounds, digest_flat(w0))
    rows: list[list[Any]] = [
        ["(no step)", "-", "-", cell(after(torch.zeros_like(w0)))] + ["-"] * len(MULTIPLES)
    ]
    rows.append(["FedAvg (true mean)", "1.000", "1.000", cell(after(mean))] + ["-"] * len(MULTIPLES))
    data_rows = []
    layer_rows: list[list[Any]] = []
    sizes = parameter_sizes(model)
    names = [name for name, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for p in model.parameters()]

    def rank_bound(rec: torch.Tensor, true: torch.Tensor, shape: tuple[int, ...]) -> tuple[str, str]:
        """A weight tensor as an (out, rest) matrix: the rank of the reconstruction, and the
        best cosine any matrix of that rank could reach with the true mean (its top singular
        values' share of the energy)."""
        if len(shape) < 2:
            return "-", "-"
        # float32 sums: singular values below 1e-5 of the largest are rounding noise
        r = int(torch.linalg.matrix_rank(rec.reshape(shape[0], -1).double(), rtol=1e-5))
        sv = torch.linalg.svdvals(true.reshape(shape[0], -1).double())
        return str(r), f"{float((sv[:r] ** 2).sum() / (sv**2).sum()) ** 0.5:.3f}"

    def per_layer_rows(label: str, agg: torch.Tensor) -> list[list[Any]]:
        """Loss of the true mean with tensor l replaced by the reconstruction's tensor l."""
        out = []
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        for i, name in enumerate(names):
            a, b = offsets[i], offsets[i + 1]
            swapped = mean.clone()
            swapped[a:b] = agg[a:b]
            share = float(mean[a:b].norm() ** 2 / mean.norm() ** 2)
            rank, best = rank_bound(agg[a:b], mean[a:b], shapes[i])
            out.append(
                [
                    label,
                    name,
                    sizes[i],
                    f"{share:.3f}",
                    f"{cosine(agg[a:b], mean[a:b]):.3f}",
                    rank,
                    best,
                    f"{float(agg[a:b].norm() / mean[a:b].norm().clamp_min(1e-30)):.2f}",
                    cell(after(swapped)),
                ]
            )
        return out

    caps = parse_ints(args.max_evals) if args.max_evals else [base_cfg.max_evals]
    settings = [
        (m, c, n) for m in args.scale_modes.split(",") for c in caps for n in parse_ints(args.samples)
    ]
    for mode, cap, n in settings:
        cfg = base_cfg.model_copy(update={"scale_mode": mode, "max_evals": cap})
        recs, coss = [], []
        for pid, u in enumerate(updates):
            comp = client_compressor(cfg, spec, pid, len(parameter_sizes(model)))
            enc = compress_update(comp, u, model, meta, Budget(n))
            recs.append(enc.transmitted)
            coss.append(enc.cosine)
        agg = sum(r * (w / total) for r, w in zip(recs, weights, strict=True))
        assert isinstance(agg, torch.Tensor)
        results = [after(m * agg) for m in MULTIPLES]
        client_cos = sum(coss) / len(coss)
        agg_cos = cosine(agg, mean)
        rows.append(
            [
                f"3SFC {mode} scale, n = {n}" + (f", {cap} evals" if args.max_evals else ""),
                f"{client_cos:.3f}",
                f"{agg_cos:.3f}",
                "-",
            ]
            + [cell(r) for r in results]
        )
        if args.per_layer:
            layer_rows.extend(per_layer_rows(f"{mode}, n = {n}", agg))
        data_rows.append(
            {
                "scale_mode": mode,
                "n": n,
                "max_evals": cap,
                "client_cosine": client_cos,
                "aggregate_cosine": agg_cos,
                "loss_acc_by_multiple": {str(m): r for m, r in zip(MULTIPLES, results, strict=True)},
            }
        )
    headers = ["update applied", "clients' mean cos", "cos(aggregate, true mean)", "test loss / acc"] + [
        f"loss / acc, {m:g}x aggregate" for m in MULTIPLES
    ]
    lines = report_head(
        f"One round of 3SFC vs FedAvg: {args.dataset}, {args.model}",
        env_info(cpu),
        SCRIPT,
        argv,
        f"{args.num_partitions} clients, Dirichlet {base_cfg.dirichlet_alpha}, {args.local_epochs} local "
        f"epochs, lr {args.lr}, batch {base_cfg.batch_size}, from the seed-0 initial weights"
        + (f" after {args.after_rounds} FedAvg rounds" if args.after_rounds else "")
        + "; no "
        "error-feedback residual yet. Loss / accuracy on the test set.",
    )
    lines.append(md_table(headers, rows))
    if layer_rows:
        lines += [
            "",
            "Per tensor: the true mean with only this tensor replaced by the aggregated reconstruction's"
            " ('share' = the tensor's share of |mean|^2, 'norm ratio' = |recon_l| / |mean_l|; 'rank' = the"
            " reconstruction's rank as an (out, in * kernel) matrix, 'best cos at that rank' = the cosine of"
            " the true mean's best approximation of that rank (truncated SVD)).",
            "",
            md_table(
                [
                    "3SFC",
                    "tensor",
                    "weights",
                    "share",
                    "cos",
                    "rank",
                    "best cos at that rank",
                    "norm ratio",
                    "loss / acc, swapped",
                ],
                layer_rows,
            ),
        ]
    out = args.out_name or f"one_round_{args.dataset}_{args.model}_e{args.local_epochs}"
    write_results(out, {"rows": data_rows, "env": env_info(cpu)}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
