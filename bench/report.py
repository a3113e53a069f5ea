"""The benchmarks' one report helper: a script measures and returns its data; this module
renders that data as ``bench/results/<name>.md`` beside ``<name>.json``.

Every script has the same shape, run by :func:`run_script`:

* ``measure(args) -> dict``: runs the measurement, returns plain data (the JSON file);
* ``render(data) -> Report``: turns that data into a :class:`Report` (title, paragraphs,
  tables), computing nothing new.

So ``python bench/<script>.py --report`` re-renders a committed result from its JSON
without measuring again, and every report carries the environment it was measured on and
the command that measured it (``data["env"]``, ``data["argv"]``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


# ----------------------------------------------------------------------- environment


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: Any = None) -> dict[str, Any]:
    """Versions, hardware and date of this measurement."""
    import flwr
    import torch

    cuda = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count_os": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "device": str(device) if device is not None else None,
        "loadavg_1m_5m_15m": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def env_markdown(info: dict[str, Any]) -> str:
    """One-paragraph environment header for the markdown reports."""
    gpu = info.get("gpu") or "none"
    la = info.get("loadavg_1m_5m_15m")
    load = "/".join(f"{v:.1f}" for v in la) if la else "?"
    return (
        f"Measured {info['date']} on {info['cpu']} ({info['cpu_affinity']} usable cores, "
        f"torch threads {info['torch_threads']}, load average {load}), GPU: {gpu}, "
        f"device: {info.get('device')}; "
        f"torch {info['torch']}, flwr {info['flwr']}, Python {info['python']}."
    )


def command_markdown(script: str, argv: Sequence[str]) -> str:
    """The report's ``Command: `.venv/bin/python bench/<script> ...` `` line."""
    return f"Command: `.venv/bin/python bench/{script} {' '.join(argv)}`".replace("py `", "py`")


# ------------------------------------------------------------------------ formatting


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before).
    Pipes inside cells (``|cos|``) are escaped so they do not split the cell."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def console_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Fixed-width console table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs dropped."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def median(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if math.isfinite(float(v))]
    return statistics.median(vals) if vals else float("nan")


def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes (kB/MB are powers of 1000)."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    n = float(n)
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Table:
    """One table of a report."""

    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]


Block = str | Table  # a paragraph (or a ``## heading``) or a table
Column = tuple[str, Callable[[dict[str, Any]], Any]]  # a header, and its cell from one data row


def column_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> Table:
    """A table with one line per data row, filled column by column."""
    return Table([h for h, _ in columns], [[cell(r) for _, cell in columns] for r in rows])


@dataclass
class Report:
    """What a report says: its title, the paragraphs before the command line (setting,
    targets), then the body; the environment and command come from the data."""

    title: str
    intro: list[str] = field(default_factory=list)
    body: list[Block] = field(default_factory=list)
    env: bool = True  # print the environment line under the title

    def markdown(self, script: str, data: dict[str, Any]) -> str:
        lines = [f"# {self.title}", ""]
        if self.env and "env" in data:
            lines += [env_markdown(data["env"]), ""]
        for par in self.intro:
            lines += [par, ""]
        lines += [command_markdown(script, data.get("argv", [])), ""]
        for block in self.body:
            lines += [md_table(block.headers, block.rows) if isinstance(block, Table) else block, ""]
        return "\n".join(lines).rstrip() + "\n"

    def console(self) -> str:
        return "\n\n".join(console_table(b.headers, b.rows) for b in self.body if isinstance(b, Table))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):  # tensors and arrays
        return obj.tolist()
    return str(obj)


def save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def result_path(name: str, ext: str) -> Path:
    """``results/<name>.<ext>`` (an absolute ``name`` puts the file there)."""
    return Path(f"{RESULTS / name}.{ext}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (none if it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _publish(script: str, report: Report, data: dict[str, Any], name: str) -> None:
    path = result_path(name, "md")
    path.write_text(report.markdown(script, data))
    print(report.console() or path.read_text())


def run_script(
    script: str,
    parser: argparse.ArgumentParser,
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any]], Report],
    argv: Sequence[str] | None = None,
    *,
    name: Callable[[argparse.Namespace], str] | None = None,
) -> dict[str, Any]:
    """Parse ``argv``, measure (or, with ``--report``, load the saved data), render, and
    write ``results/<name>.json`` and ``.md`` (``name(args)``, else the ``--out-name``
    option if the script has one, else the script's stem)."""
    parser.add_argument(
        "--report", action="store_true", help="re-render the report from its saved JSON; measure nothing"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    stem = name(args) if name else getattr(args, "out_name", None) or Path(script).stem
    if args.report:
        data = json.loads(result_path(stem, "json").read_text())
    else:
        data = measure(args)
        data["argv"] = [a for a in argv if a != "--report"]
        save_json(result_path(stem, "json"), data)
    _publish(script, render(data), data, stem)
    return data


def run_resumable(
    script: str,
    parser: argparse.ArgumentParser,
    measure: Callable[[argparse.Namespace, Path], None],
    load: Callable[[list[dict[str, Any]]], dict[str, Any]],
    render: Callable[[dict[str, Any]], Report],
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """:func:`run_script` for scripts that append one JSON line per run to
    ``results/<out-name>.jsonl`` and skip the runs already there: measure what is missing
    (``measure(args, jsonl)``) unless ``--report``, then render every line (``load`` turns
    them into the report's data). A stopped run leaves more lines than one saved JSON
    would hold, so ``<out-name>.json`` keeps only the environment of the last measuring call."""
    parser.add_argument("--report", action="store_true", help="only render the markdown from the JSON lines")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    saved, jsonl = result_path(args.out_name, "json"), result_path(args.out_name, "jsonl")
    if args.report and saved.exists():
        env = json.loads(saved.read_text())["env"]
    else:
        if not args.report:
            measure(args, jsonl)
        env = env_info("cpu")
        save_json(saved, {"env": env, "jsonl": jsonl.name})
    data = {"env": env, "argv": argv, **load(read_jsonl(jsonl))}
    _publish(script, render(data), data, args.out_name)
    return data
