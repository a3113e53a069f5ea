"""Turn ``--config FILE`` plus ``key=value`` arguments into one validated override set.

``flwr run`` accepts either one TOML file or inline pairs, not both; we merge them here
and pass everything inline, with relative paths made absolute against the directory the
user launched from (Flower runs the app from its own install directory).
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from e3sfc_core.config import ExperimentConfig, parse_pairs
from e3sfc_core.errors import ConfigError

PATH_KEYS = ("output-dir", "data-root")


def collect(config_file: Path | None, pairs: Sequence[str], base_dir: Path) -> dict[str, Any]:
    """Merged overrides (file first, then pairs), validated, paths made absolute.

    Raises
    ------
    ConfigError
        For unknown keys or bad values, before anything is started.
        Also for a pair without ``=``.
    """
    overrides: dict[str, Any] = {}
    if config_file is not None:
        overrides.update(tomllib.loads(config_file.read_text()))
    overrides.update(parse_pairs(pairs))
    ExperimentConfig.from_run_config(overrides)  # fail fast, naming the key
    for key in PATH_KEYS:
        path = Path(str(overrides.get(key, ExperimentConfig().to_run_config()[key]))).expanduser()
        overrides[key] = str(path if path.is_absolute() else (base_dir / path).resolve())
    return overrides


def to_flwr_run_config(overrides: dict[str, Any]) -> str:
    """Inline ``--run-config`` text: TOML values separated by spaces."""
    parts = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def cli_overrides(
    prog: str, config_file: Path | None, pairs: Sequence[str], base_dir: Path, num_partitions: int
) -> dict[str, Any] | None:
    """:func:`collect` for a command-line tool: prints the problem and returns ``None``
    (exit code 2) instead of raising; ``num-partitions`` defaults to the node count."""
    try:
        overrides = collect(config_file, pairs, base_dir)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    overrides.setdefault("num-partitions", num_partitions)
    return overrides
