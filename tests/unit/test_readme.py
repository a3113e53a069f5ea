"""The README's promises: its Python example runs, and its config table is complete."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

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


def _sync_readme() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "sync_readme.py"
    spec = importlib.util.spec_from_file_location("sync_readme", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_readme_tables_are_the_result_files() -> None:
    sync = _sync_readme()
    readme = sync.BENCH / "README.md"
    assert sync.synced(readme.read_text(), sync.BENCH / "results") == readme.read_text(), (
        "bench/README.md differs from bench/results/*.md: run bench/sync_readme.py"
    )


def test_sync_readme_replaces_a_stale_block(tmp_path: Path) -> None:
    # Prepare: a README whose copied block is stale, and the result file it copies
    (tmp_path / "r.md").write_text("# Title\n\nnew 2\n\n![plot](r.png)\n")
    readme = "intro\n<!-- copied from results/r.md -->\n### Title\n\nold 1\n\n## Next\nkept\n"

    # Execute
    out = _sync_readme().synced(readme, tmp_path)

    # Assert
    assert out == (
        "intro\n<!-- copied from results/r.md -->\n### Title\n\nnew 2\n\n"
        "![plot](results/r.png)\n\n## Next\nkept\n"
    )


def test_readme_flower_table_is_the_result_file() -> None:
    result = Path(__file__).resolve().parents[2] / "bench" / "results" / "flower_digits.md"
    rows = [line for line in result.read_text().splitlines() if line.startswith("|")]
    assert len(rows) > 2
    missing = [row for row in rows if row not in README.splitlines()]
    assert not missing, f"README's Flower table differs from {result.name}: {missing}"
