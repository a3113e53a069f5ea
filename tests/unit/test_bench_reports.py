"""Every committed benchmark report is what its script renders from its committed data: a
report cannot drift from the numbers its command measured (``bench/report.py``)."""

from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from bench.report import RESULTS, read_jsonl

# results/<name>.md -> the script that wrote it (from its JSON, or from JSON lines)
FROM_JSON = {
    "accuracy_vs_bytes": "accuracy_vs_bytes",
    "client_start": "client_start",
    "compression_speed": "compression_speed",
    "compressors": "compressors",
    "diag_convnet_a01": "diagnose_3sfc",
    "diag_convnet_a01_share": "diagnose_3sfc",
    "early_stop_accuracy": "accuracy_vs_bytes",
    "encoding": "encoding",
    "equal_budget": "equal_budget",
    "flower_framing": "flower_framing",
    "powersgd_q0": "powersgd_q0",
    "speed": "speed",
}
FROM_JSONL = {"model_matrix": "model_matrix", "budget": "budget"}


def _committed(name: str) -> str:
    return (RESULTS / f"{name}.md").read_text()


def _command_args(markdown: str) -> list[str]:
    """The arguments of the report's ``Command:`` line."""
    line = next(x for x in markdown.splitlines() if x.startswith("Command: `"))
    return shlex.split(line.removeprefix("Command: `").rstrip("`"))[2:]


@pytest.mark.parametrize("name", sorted(FROM_JSON))
def test_a_report_is_its_data_rendered(name: str) -> None:
    script = FROM_JSON[name]
    data = json.loads((RESULTS / f"{name}.json").read_text())
    rendered = importlib.import_module(f"bench.{script}").render(data).markdown(f"{script}.py", data)
    assert rendered == _committed(name)


@pytest.mark.parametrize("name", sorted(FROM_JSONL))
def test_a_resumable_report_is_its_json_lines_rendered(name: str) -> None:
    module = importlib.import_module(f"bench.{FROM_JSONL[name]}")
    env = json.loads((RESULTS / f"{name}.json").read_text())["env"]
    committed = _committed(name)
    data: dict[str, Any] = {"env": env, "argv": _command_args(committed)}
    data.update(module.load(read_jsonl(RESULTS / f"{name}.jsonl")))
    assert module.render(data).markdown(f"{name}.py", data) == committed


def test_the_deployment_comparison_is_its_runs_rendered() -> None:
    from bench.deployment_bench import render_compare

    committed = _committed("deployment_compare")
    argv = _command_args(committed)
    names = argv[argv.index("--compare") + 1].split(",")
    runs = {n: json.loads(Path(RESULTS / f"deployment_{n}.json").read_text()) for n in names}
    assert render_compare(runs).markdown("deployment_bench.py", {"argv": argv}) == committed
