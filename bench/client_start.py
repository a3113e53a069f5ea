"""What a cold ClientApp process pays before it trains: imports and its partition.

A deployed SuperNode starts a fresh ClientApp process for every message (issue 13), so
these seconds are paid every round. Each measurement is a fresh interpreter, repeated
``--repeats`` times, interleaved, median reported:

* ``import torch`` alone, and ``import client_app.app`` (the ClientApp's module): the
  difference is what the app adds to torch (goal: at most 0.7 s);
* the same breakdown from ``python -X importtime`` (one process that imports torch, then
  the app): the app's own modules after torch is loaded;
* loading a client's partition (``e3sfc_core.client.client_data``) without the cache
  (read, normalise and partition the whole dataset) and from a warm on-disk cache;
* a process's first local training (``e3sfc_core.training.train_local``, digits MLP, 5
  epochs), next to what constructing a first ``torch.optim.SGD`` costs a fresh process
  (``train_local`` used one until it wrote the step out: that constructor imports
  ``torch._dynamo``).

    .venv/bin/python bench/client_start.py --repeats 5

Writes ``bench/results/client_start.{json,md}`` (``--report`` re-renders the md from the JSON).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.report import REPO, Report, Table, env_info, median, run_script

LOAD = (
    "import time, sys\n"
    "from e3sfc_core.config import ExperimentConfig\n"
    "from e3sfc_core.client import client_data\n"
    "t = time.perf_counter()\n"
    "cfg = ExperimentConfig(dataset=sys.argv[1], num_partitions=10)\n"
    "client_data(cfg, 3, 10, sys.argv[2], sys.argv[3] or None)\n"
    "print(time.perf_counter() - t)\n"
)
FIRST_TRAINING = (
    "import time, torch\n"
    "import client_app.app\n"
    "from e3sfc_core.client import client_data\n"
    "from e3sfc_core.config import ExperimentConfig\n"
    "from e3sfc_core.models import build_model\n"
    "from e3sfc_core.training import train_local\n"
    "cfg = ExperimentConfig(dataset='digits', num_partitions=10)\n"
    "data = client_data(cfg, 3, 10, 'data', None)\n"
    "model = build_model('mlp', (1, 8, 8), 10, 0)\n"
    "t = time.perf_counter()\n"
    "train_local(model, data, epochs=5, lr=0.05, batch_size=32, device=torch.device('cpu'), seed=1)\n"
    "print(time.perf_counter() - t)\n"
)
FIRST_TORCH_OPTIMISER = (
    "import time, torch\n"
    "model = torch.nn.Linear(64, 10)\n"
    "t = time.perf_counter()\n"
    "torch.optim.SGD(model.parameters(), lr=0.05)\n"
    "print(time.perf_counter() - t)\n"
)


def python(*argv: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter in the repository with these arguments; its output captured."""
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, check=True, capture_output=True, text=True, timeout=300
    )


def wall(code: str) -> float:
    """Seconds a fresh interpreter takes to run ``code`` (start-up included)."""
    start = time.perf_counter()
    python("-c", code)
    return time.perf_counter() - start


def inner(code: str, *args: str) -> float:
    """The seconds ``code`` prints (a timing taken inside the process)."""
    return float(python("-c", code, *args).stdout.strip().splitlines()[-1])


def app_after_torch() -> list[tuple[str, float]]:
    """Cumulative import seconds of what ``import client_app.app`` loads once torch is
    already imported (``-X importtime``): the app and the modules it imports directly."""
    out = python("-X", "importtime", "-c", "import torch; import client_app.app")
    rows, after_torch = [], False
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, raw = line.split("|")
        name, depth = raw.strip(), (len(raw) - len(raw.lstrip()) - 1) // 2
        after_torch = after_torch or (name == "torch" and depth == 0)
        if after_torch and name != "torch" and depth <= 1 and cumulative.strip().isdigit():
            rows.append(("  " * depth + name, int(cumulative) / 1e6))
    return sorted(rows, key=lambda r: -r[1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--datasets", default="digits,mnist", help="comma-separated; mnist needs data/MNIST")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out-name", default="client_start")
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    times: dict[str, list[float]] = {"import torch": [], "import client_app.app": []}
    loads: dict[str, dict[str, list[float]]] = {}
    first: dict[str, list[float]] = {"first train_local": [], "first torch.optim.SGD(...)": []}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.repeats):
            times["import torch"].append(wall("import torch"))
            times["import client_app.app"].append(wall("import client_app.app"))
            first["first train_local"].append(inner(FIRST_TRAINING))
            first["first torch.optim.SGD(...)"].append(inner(FIRST_TORCH_OPTIMISER))
            for ds in args.datasets.split(","):
                rows = loads.setdefault(ds, {"no cache": [], "warm cache": []})
                rows["no cache"].append(inner(LOAD, ds, args.data_root, ""))
                inner(LOAD, ds, args.data_root, cache)  # fills the cache on the first repeat
                rows["warm cache"].append(inner(LOAD, ds, args.data_root, cache))
    return {
        "env": env_info("cpu"),
        "repeats": args.repeats,
        "import_seconds": times,
        "app_adds_to_torch_s": median(times["import client_app.app"]) - median(times["import torch"]),
        "app_modules_after_torch_s": app_after_torch(),
        "partition_load_seconds": loads,
        "first_step_seconds": first,
    }


def render(data: dict[str, Any]) -> Report:
    times, loads = data["import_seconds"], data["partition_load_seconds"]
    imports = [  # the JSON sorts its keys: torch alone first
        [k, f"{median(times[k]):.2f}", ", ".join(f"{x:.2f}" for x in times[k])]
        for k in ("import torch", "import client_app.app")
    ]
    modules = [[f"`{name.strip()}`", f"{s:.3f}"] for name, s in data["app_modules_after_torch_s"][:10]]
    partition = [
        [ds, f"{median(r['no cache']):.3f}", f"{median(r['warm cache']):.3f}"] for ds, r in loads.items()
    ]
    return Report(
        "Cold ClientApp start: imports and partition loading",
        intro=[
            "Each number is the median over fresh interpreters (interleaved repeats). Import rows are "
            "wall time of `python -c ...` (interpreter start-up included); partition rows are timed "
            "inside the process after the imports (`e3sfc_core.client.client_data`, partition 3 of "
            "10, Dirichlet 1.0, seed 0), without the on-disk cache and from a warm one."
        ],
        body=[
            "## Imports",
            Table(["process", "median s", "all runs (s)"], imports),
            f"`import client_app.app` adds **{data['app_adds_to_torch_s']:.2f} s** to `import torch` "
            "(goal: at most 0.7 s). What it loads after torch (`-X importtime`, cumulative, top level):",
            Table(["module", "s"], modules),
            "## A client's partition",
            Table(["dataset", "no cache (s)", "warm cache (s)"], partition),
            *first_training(data),
        ],
    )


def first_training(data: dict[str, Any]) -> list[Any]:
    """The section on a fresh process's first training."""
    seconds = data["first_step_seconds"]
    rows = [
        [k, f"{median(seconds[k]):.3f}", ", ".join(f"{x:.3f}" for x in seconds[k])]
        for k in ("first train_local", "first torch.optim.SGD(...)")  # in this order, not the JSON's
    ]
    return [
        "## A fresh process's first training",
        "Timed inside a fresh process after its imports: the first `train_local` (digits MLP, 5 "
        "epochs on partition 3 of 10, read without the cache before the timer starts), and "
        "the construction of a first `torch.optim.SGD` (it imports `torch._dynamo`; `train_local` "
        "writes the step out instead, `e3sfc_core.training.sgd_step`).",
        Table(["in a fresh process", "median s", "all runs (s)"], rows),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("client_start.py", parser(), measure, render, argv)


if __name__ == "__main__":
    main()
