"""Where the time goes, and how it grows (issue #5, item 3).

Command (CPU, a few minutes; resnet18 does one 3SFC compression)::

    .venv/bin/python bench/speed.py

Quick smoke run::

    .venv/bin/python bench/speed.py --rounds 2 --methods fedavg,e3sfc --models mlp,lenet5 --clients 10,20

On a GPU machine (every timing synchronises CUDA; GPU peak memory is reported too)::

    .venv/bin/python bench/speed.py --device cuda

Three parts, each setting in its own subprocess so that peak memory is per setting:

1. **Per round** (digits/MLP, ``--rounds`` rounds, 10 clients, every method, through
   ``run_reference``): seconds per round split into local training and compression per
   client (the reply metrics ``train-seconds``/``compress-seconds``), the server's
   ``aggregate_seconds`` (validation + decompression of every uplink + clipping and
   averaging + for E-3SFC the downlink compression) and the downlink compression alone
   (``RoundRecord.compress_seconds`` minus the clients' mean; e3sfc only). Wall seconds per
   round also include evaluation, partition loading and writing metrics.csv.
2. **Model size** (``--models`` on ``--input-shape`` 3,32,32 random data, 10 classes):
   one local epoch of ``--train-samples`` random examples (batch 32), then that real local
   update is the target of 3SFC (n = 1, shipped search settings) and Top-k 1 %: seconds to
   compress, per closure evaluation, to decompress, and to encode / decode one payload.
   3SFC runs ``--repeats`` times (``--big-repeats`` for models over 5M weights).
3. **Number of clients** (digits, e3sfc and fedavg, ``--clients`` 10..100 simulated
   clients, ``--client-rounds`` rounds): seconds per round, per client, on the server.

Peak memory: the process's peak RSS (``VmHWM``, reset per phase through
``/proc/self/clear_refs`` where the kernel allows, else ``ru_maxrss``) and, on CUDA,
``torch.cuda.max_memory_allocated``. Writes ``bench/results/<out-name>.{json,md}``
(default ``speed``, ``speed_<device>`` off the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import parse_ints, set_threads, timed_roundtrip
from bench.report import (
    REPO,
    RESULTS,
    Column,
    Report,
    column_table,
    env_info,
    fmt_bytes,
    median,
    run_script,
)

BIG_MODEL = 5_000_000


# --------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB; peak falls back to ru_maxrss."""
    cur = peak = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    if peak != peak:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return cur, peak


class Phase:
    """Peak RSS (and CUDA peak) of a block of code."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def __enter__(self) -> Phase:
        import torch

        self.before = rss_mb()[0]
        self.reset = reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self.rss, self.peak = rss_mb()
        self.cuda_peak = (
            torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        )


# -------------------------------------------------------------------------- workers


def worker_rounds(job: dict[str, Any]) -> dict[str, Any]:
    """Part 1 and part 3: one federated run, time split per round."""
    import torch

    from bench.common import run_federated

    device = torch.device("cuda" if job["device"] == "cuda" else "cpu")
    with Phase(device) as ph:
        res = run_federated(job["config"], REPO, finalize=False)
    recs, cms = res["records"], res["client_metrics"]
    per_round = []
    for rec in recs:
        mine = [c for c in cms if c["round"] == rec["round"]]
        train = sum(c["train-seconds"] for c in mine) / len(mine)
        comp = sum(c["compress-seconds"] for c in mine) / len(mine)
        per_round.append(
            {
                "round": rec["round"],
                "train_s_client_mean": train,
                "compress_s_client_mean": comp,
                "train_s_sum": sum(c["train-seconds"] for c in mine),
                "compress_s_sum": sum(c["compress-seconds"] for c in mine),
                "aggregate_s": rec["aggregate_seconds"],
                "downlink_compress_s": max(0.0, rec["compress_seconds"] - comp),
                "uplink_bytes": rec["uplink_bytes"],
                "downlink_bytes": rec["downlink_bytes"],
            }
        )
    return {
        "per_round": per_round,
        "wall_s": res["wall_seconds"],
        "rounds": len(recs),
        "final_accuracy": recs[-1]["accuracy"] if recs else None,
        "peak_rss_mb": ph.peak,
        "rss_mb": ph.rss,
        "rss_before_mb": ph.before,
        "peak_reset": ph.reset,
        "cuda_peak_mb": ph.cuda_peak,
        "clients": len({c["node"] for c in cms}),
    }


def worker_model(job: dict[str, Any]) -> dict[str, Any]:
    """Part 2: train / compress / decompress / encode / decode times of one model."""
    import torch

    from e3sfc_core.compressor import CompressorSettings, PayloadMeta, build_compressor
    from e3sfc_core.datasets import DatasetSpec, TensorData
    from e3sfc_core.models import build_model
    from e3sfc_core.payload import Direction
    from e3sfc_core.tensors import cosine, digest_flat, get_flat, num_params, set_flat
    from e3sfc_core.training import train_local

    set_threads(job["threads"])
    device = torch.device(job["device"])
    shape, classes = tuple(job["input_shape"]), job["n_classes"]
    spec = DatasetSpec("random", shape, classes)  # type: ignore[arg-type]
    out: dict[str, Any] = {"model": job["model"], "input_shape": list(shape)}
    with Phase(device) as ph:
        model = build_model(job["model"], shape, classes, 0).to(device)
        gen = torch.Generator().manual_seed(0)
        data = TensorData(
            torch.randn((job["train_samples"], *shape), generator=gen),
            torch.randint(0, classes, (job["train_samples"],), generator=gen),
        )
        base = get_flat(model)
    out.update(numel=num_params(model), setup_peak_rss_mb=ph.peak, import_rss_mb=ph.before)
    with Phase(device) as ph:
        stats = train_local(model, data, epochs=1, lr=0.05, batch_size=32, device=device, seed=0)
    steps = -(-len(data) // 32)
    target = get_flat(model) - base
    set_flat(model, base)
    model.eval()
    out.update(
        train_s=stats.seconds,
        train_steps=steps,
        train_s_per_step=stats.seconds / steps,
        train_peak_rss_mb=ph.peak,
        train_cuda_peak_mb=ph.cuda_peak,
    )
    meta = PayloadMeta(Direction.UPLINK, 1, digest_flat(base))

    def roundtrip(name: str, settings: CompressorSettings, n: int) -> dict[str, Any]:
        comp = build_compressor(name, settings, spec)
        rt = timed_roundtrip(comp, target, model, meta, n, device, around=lambda: Phase(device))
        ph, ph2 = rt["compress_ctx"], rt["decompress_ctx"]
        return {
            "compress_s": rt["compress"].seconds,
            "evals": rt["stats"].evaluations,
            "bytes": len(rt["blob"]),
            "encode_s": rt["encode"].seconds,
            "decode_s": rt["decode"].seconds,
            "decompress_s": rt["decompress"].seconds,
            "cosine": abs(cosine(rt["transmitted"], target)),
            "compress_peak_rss_mb": ph.peak,
            "compress_rss_before_mb": ph.before,
            "compress_cuda_peak_mb": ph.cuda_peak,
            "decompress_peak_rss_mb": ph2.peak,
            "decompress_cuda_peak_mb": ph2.cuda_peak,
        }

    settings = CompressorSettings(seed=1)
    repeats = job["big_repeats"] if out["numel"] > BIG_MODEL else job["repeats"]
    out["3sfc"] = [roundtrip("3sfc", settings, 1) for _ in range(repeats)]
    out["topk"] = [roundtrip("topk", settings, 1) for _ in range(3)]
    out["fedavg"] = roundtrip("fedavg", settings, 1)
    return out


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh interpreter (clean peak memory), return its JSON."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """The ``--worker`` entry point: run ``job``, print its result as a ``RESULT`` line."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    set_threads(job.get("threads", 1))
    result = worker_model(job) if job["kind"] == "model" else worker_rounds(job)
    print("RESULT " + json.dumps(result))
    return result


# -------------------------------------------------------------------------- measure


def rounds_row(method: str, r: dict[str, Any], clients: int) -> dict[str, Any]:
    """The columns parts 1 and 3 share, from one ``worker_rounds`` result: medians over
    rounds of the per-client and server seconds, and 'other' = wall per round -
    ``clients`` x (train + compress per client) - server aggregate."""
    pr = r["per_round"]
    row = {
        "method": method,
        "wall_s_per_round": r["wall_s"] / r["rounds"],
        "train_s_client": median([x["train_s_client_mean"] for x in pr]),
        "compress_s_client": median([x["compress_s_client_mean"] for x in pr]),
        "aggregate_s": median([x["aggregate_s"] for x in pr]),
        "uplink_bytes_per_round": pr[-1]["uplink_bytes"],
        "peak_rss_mb": r["peak_rss_mb"],
        "rss_before_mb": r["rss_before_mb"],
        "per_round": pr,
    }
    row["other_s_per_round"] = (
        row["wall_s_per_round"]
        - clients * (row["train_s_client"] + row["compress_s_client"])
        - row["aggregate_s"]
    )
    return row


def model_row(model: str, r: dict[str, Any]) -> dict[str, Any]:
    """Part 2's row of one ``worker_model`` result: medians over the repeats."""
    s, tk, d = r["3sfc"], r["topk"], r["fedavg"]
    row = {
        "model": model,
        "numel": r["numel"],
        "train_s_per_step": r["train_s_per_step"],
        "sfc_compress_s": median([x["compress_s"] for x in s]),
        "sfc_evals": median([x["evals"] for x in s]),
        "sfc_decompress_s": median([x["decompress_s"] for x in s]),
        "sfc_bytes": s[0]["bytes"],
        "sfc_encode_s": median([x["encode_s"] for x in s]),
        "sfc_decode_s": median([x["decode_s"] for x in s]),
        "sfc_cosine": median([x["cosine"] for x in s]),
        "topk_compress_s": median([x["compress_s"] for x in tk]),
        "topk_encode_s": median([x["encode_s"] for x in tk]),
        "topk_decode_s": median([x["decode_s"] for x in tk]),
        "dense_encode_s": d["encode_s"],
        "dense_decode_s": d["decode_s"],
        "peak_rss_compress_mb": max(x["compress_peak_rss_mb"] for x in s),
        "rss_before_compress_mb": s[0]["compress_rss_before_mb"],
        "import_rss_mb": r["import_rss_mb"],
        "peak_rss_train_mb": r["train_peak_rss_mb"],
        "setup_peak_rss_mb": r["setup_peak_rss_mb"],
        "cuda_peak_compress_mb": s[0]["compress_cuda_peak_mb"],
        "raw": r,
    }
    row["sfc_s_per_eval"] = row["sfc_compress_s"] / max(1, row["sfc_evals"])
    return row


def out_name(args: argparse.Namespace) -> str:
    return args.out_name or ("speed" if args.device == "cpu" else f"speed_{args.device}")


def parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help
    )
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=5, help="rounds of part 1")
    p.add_argument("--methods", default="fedavg,topk,stc,signsgd,qsgd,3sfc,e3sfc")
    p.add_argument("--models", default="mlp,convnet,lenet5,resnet18")
    p.add_argument("--input-shape", default="3,32,32")
    p.add_argument("--train-samples", type=int, default=256, help="random examples for one local epoch")
    p.add_argument("--repeats", type=int, default=3, help="3SFC compressions per model")
    p.add_argument("--big-repeats", type=int, default=1, help="3SFC compressions for models > 5M weights")
    p.add_argument("--clients", default="10,20,50,100")
    p.add_argument("--client-methods", default="e3sfc,fedavg")
    p.add_argument("--client-rounds", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of parts to skip: rounds,models,clients")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-name", default="")
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)  # the workers set it too; this makes env_info report it
    skip = set(args.skip.split(","))
    base_cfg = {
        "dataset": "digits",
        "model": "mlp",
        "device": args.device,
        "output-dir": str(RESULTS / "runs" / out_name(args)),
    }
    data: dict[str, Any] = {"args": vars(args)}

    def run_rounds(cfg: dict[str, Any]) -> dict[str, Any]:
        return spawn({"kind": "rounds", "config": cfg, "device": args.device, "threads": args.threads})

    if "rounds" not in skip:
        data["rounds"] = []
        for method in [m for m in args.methods.split(",") if m]:
            cfg = {**base_cfg, "method": method, "num-rounds": args.rounds, "run-name": f"rounds-{method}"}
            r = run_rounds(cfg)
            row = rounds_row(method, r, r["clients"])
            row["downlink_compress_s"] = median([x["downlink_compress_s"] for x in r["per_round"]])
            row["cuda_peak_mb"] = r["cuda_peak_mb"]
            row["compress_over_train"] = row["compress_s_client"] / row["train_s_client"]
            data["rounds"].append(row)
            print(f"rounds: {method} done")

    if "models" not in skip:
        data["models"] = []
        for model in [m for m in args.models.split(",") if m]:
            job = {
                "kind": "model",
                "model": model,
                "input_shape": parse_ints(args.input_shape),
                "n_classes": 10,
                "device": args.device,
                "threads": args.threads,
                "train_samples": args.train_samples,
                "repeats": args.repeats,
                "big_repeats": args.big_repeats,
            }
            t0 = time.perf_counter()
            data["models"].append(model_row(model, spawn(job)))
            print(f"models: {model} done in {time.perf_counter() - t0:.1f}s")

    if "clients" not in skip:
        data["clients"] = []
        for method in [m for m in args.client_methods.split(",") if m]:
            for n in parse_ints(args.clients):
                cfg = {
                    **base_cfg,
                    "method": method,
                    "num-rounds": args.client_rounds,
                    "num-partitions": n,
                    "run-name": f"clients-{method}-{n}",
                }
                r = run_rounds(cfg)
                row = rounds_row(method, r, n)
                row["clients"] = n
                row["downlink_bytes_per_round"] = r["per_round"][-1]["downlink_bytes"]
                data["clients"].append(row)
                print(f"clients: {method} {n} done")

    data["env"] = env_info(args.device)
    return data


# --------------------------------------------------------------------------- render

def _ms(key: str, digits: int = 1) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r[key] * 1e3:.{digits}f} ms"


def _rss(peak: str = "peak_rss_mb", before: str = "rss_before_mb") -> Callable[[dict[str, Any]], str]:
    """``"<peak> (+<growth over before>)"`` in MiB, for the tables' peak-RSS columns."""
    return lambda r: f"{r[peak]:.0f} (+{r[peak] - r[before]:.0f})"


_CLIENT_COLUMNS: list[Column] = [
    ("train s/client", _ms("train_s_client")),
    ("compress s/client", _ms("compress_s_client")),
]
_RSS_COLUMN: Column = ("peak RSS MiB (+ over start)", _rss())
ROUNDS_COLUMNS: list[Column] = [
    ("method", lambda r: r["method"]),
    ("wall s/round", lambda r: f"{r['wall_s_per_round']:.3f}"),
    *_CLIENT_COLUMNS,
    ("server aggregate s", _ms("aggregate_s")),
    ("downlink compress s", lambda r: _ms("downlink_compress_s")(r) if r["method"] == "e3sfc" else "-"),
    ("other s/round", lambda r: f"{r['other_s_per_round']:.3f}"),
    ("compress / train", lambda r: f"{r['compress_over_train']:.2f}"),
    ("uplink B/round", lambda r: fmt_bytes(r["uplink_bytes_per_round"])),
    _RSS_COLUMN,
]
MODELS_COLUMNS: list[Column] = [
    ("model", lambda r: r["model"]),
    ("weights", lambda r: f"{r['numel']:,}"),
    ("train s/step (b=32)", _ms("train_s_per_step")),
    ("3SFC compress s", lambda r: f"{r['sfc_compress_s']:.3f}"),
    ("evals", lambda r: f"{r['sfc_evals']:.0f}"),
    ("s/eval", _ms("sfc_s_per_eval")),
    ("3SFC decompress s", _ms("sfc_decompress_s")),
    ("3SFC bytes", lambda r: r["sfc_bytes"]),
    ("3SFC enc/dec ms", lambda r: f"{r['sfc_encode_s'] * 1e3:.2f}/{r['sfc_decode_s'] * 1e3:.2f}"),
    ("Top-k 1% compress ms", lambda r: f"{r['topk_compress_s'] * 1e3:.1f}"),
    ("Top-k enc/dec ms", lambda r: f"{r['topk_encode_s'] * 1e3:.2f}/{r['topk_decode_s'] * 1e3:.2f}"),
    ("dense enc/dec ms", lambda r: f"{r['dense_encode_s'] * 1e3:.1f}/{r['dense_decode_s'] * 1e3:.1f}"),
    ("peak RSS MiB in 3SFC compress (+ over start)", _rss("peak_rss_compress_mb", "rss_before_compress_mb")),
    ("GPU peak MiB", lambda r: "-" if (v := r["cuda_peak_compress_mb"]) is None else f"{v:.0f}"),
]
CLIENTS_COLUMNS: list[Column] = [
    ("method", lambda r: r["method"]),
    ("clients", lambda r: r["clients"]),
    ("wall s/round", lambda r: f"{r['wall_s_per_round']:.2f}"),
    *_CLIENT_COLUMNS,
    ("server aggregate s", _ms("aggregate_s", 0)),
    ("other s/round", lambda r: f"{r['other_s_per_round']:.2f}"),
    ("uplink B/round", lambda r: fmt_bytes(r["uplink_bytes_per_round"])),
    ("downlink B/round", lambda r: fmt_bytes(r["downlink_bytes_per_round"])),
    _RSS_COLUMN,
]


def render(data: dict[str, Any]) -> Report:
    args = data["args"]
    body: list[Any] = []
    if "rounds" in data:
        body += [
            "## 1. Seconds per round (digits/MLP, 10 clients)",
            f"{args['rounds']} rounds per method, medians over rounds; per-client columns are means over "
            "the round's clients (clients run one after another in one process, so a round's client time "
            "is 10x these). Server aggregate = validation + decompressing every uplink + clip/average + "
            "(e3sfc) downlink compression. 'other' = wall - clients x (train + compress) - aggregate: "
            "per-client model construction, partition slicing, downlink replay and digests, the server's "
            "test evaluation and metrics.csv. Peak RSS is the whole process (torch alone is most of it); "
            "'+' is the growth over the RSS when the run started. Wall time excludes finalisation "
            "(summary.json, plots).",
            column_table(ROUNDS_COLUMNS, data["rounds"]),
        ]
    if "models" in data:
        body += [
            f"## 2. Growth with model size (random data {tuple(parse_ints(args['input_shape']))}, "
            "10 classes)",
            f"Target: the local update of one epoch over {args['train_samples']} random examples. 3SFC "
            "n = 1 with the shipped search settings (at most 20 evaluations, stall rule); its cosine on "
            "these random-data targets is not meaningful, its time per evaluation is. 'enc/dec' = encode "
            "/ decode of one payload. Peak RSS is the whole process (Python + torch + model) during "
            "compression.",
            column_table(MODELS_COLUMNS, data["models"]),
        ]
    if "clients" in data:
        body += [
            f"## 3. Growth with the number of clients (digits/MLP, {args['client_rounds']} rounds)",
            "All clients train every round (fraction-train 1), one after another in one process; digits "
            "has 1,437 training images, so 100 clients hold ~14 each (training time per client shrinks, "
            "compression time does not).",
            column_table(CLIENTS_COLUMNS, data["clients"]),
        ]
    return Report("Speed and memory (issue #5, item 3)", body=body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    known = parser(add_help=False).parse_known_args(argv)[0]  # a worker process writes no report
    if known.worker:
        return worker(json.loads(known.worker))
    return run_script("speed.py", parser(), measure, render, argv, name=out_name)


if __name__ == "__main__":
    main()
