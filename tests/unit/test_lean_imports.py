"""A ClientApp starts a fresh process for every message in a deployment, so what its
import pulls in is paid every round: heavy optional libraries must wait until a run
actually needs them (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torchvision", "sklearn", "scipy", "matplotlib")


def _loaded_after(code: str) -> set[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return {name.split(".")[0] for name in json.loads(out.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("module", ["client_app.app", "server_app.app", "e3sfc_core"])
def test_importing_the_apps_loads_no_heavy_optional_library(module: str) -> None:
    loaded = _loaded_after(f"import {module}")
    assert not loaded & set(HEAVY), f"{module} imports {sorted(loaded & set(HEAVY))}"


def test_an_mlp_on_digits_never_loads_torchvision() -> None:
    loaded = _loaded_after(
        "from e3sfc_core.datasets import load_dataset\n"
        "from e3sfc_core.models import build_model\n"
        "from pathlib import Path\n"
        "train, test, spec = load_dataset('digits', Path('.'), False)\n"
        "build_model('mlp', tuple(spec.input_shape), spec.n_classes, 0)"
    )
    assert "torchvision" not in loaded and "sklearn" in loaded
