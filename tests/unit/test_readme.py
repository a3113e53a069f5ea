"""The README's promises: its Python example runs, and its config table is complete."""

from __future__ import annotations

import re
from pathlib import Path

from e3sfc_core.config import ExperimentConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_python_api_example_runs() -> None:
    block = README.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 (our own document)


def test_config_table_lists_every_key_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` \| `([^`]*)` \|", README, flags=re.M))
    for key, value in ExperimentConfig().to_run_config().items():
        assert key in rows, f"README config table lacks {key}"
        shown = {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else value
        expected = f'"{shown}"' if isinstance(value, str) else str(shown)
        assert rows[key] == expected, f"{key}: README says {rows[key]}, default is {expected}"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = README.split("Run the tests", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert command in ci.splitlines()
