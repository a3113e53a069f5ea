"""Architecture boundaries: the core imports no Flower, and nothing unpickles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("e3sfc_core", "e3sfc_flower", "server_app", "client_app")
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def test_core_imports_no_flower() -> None:
    # Prepare
    code = (
        "import json, sys\n"
        "import e3sfc_core, e3sfc_core.simulate, e3sfc_core.experiment\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))))\n"
    )

    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )

    # Assert
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def violations(source: str) -> list[str]:
    """Pickle imports, ``torch.load`` calls and ``np.load(..., allow_pickle=True)`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
            found.append(f"from {node.module} import")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "torch"
            and any(a.name == "load" for a in node.names)
        ):
            found.append("from torch import load")
        elif isinstance(node, ast.Call):
            func = node.func
            name = ast.unparse(func)
            if name in ("torch.load", "torch.serialization.load"):
                found.append(name)
            if name in ("__import__", "importlib.import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in PICKLERS:
                    found.append(f"{name}({arg.value!r})")
            if isinstance(func, ast.Attribute) and func.attr in ("load", "loads"):
                for kw in node.keywords:
                    if kw.arg == "allow_pickle" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is False
                    ):
                        found.append(f"{name}(allow_pickle={ast.unparse(kw.value)})")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import pickle as p",
        "from pickle import loads",
        "import cloudpickle",
        "import torch\ntorch.load('x')",
        "from torch import load",
        "import numpy as np\nnp.load('x', allow_pickle=True)",
        "import numpy\nnumpy.load('x', allow_pickle=flag)",
        "__import__('pickle')",
        "import importlib\nimportlib.import_module('pickle')",
    ],
)
def test_checker_catches_violations(snippet: str) -> None:
    # Execute / Assert
    assert violations(snippet)


def test_checker_allows_safe_loading() -> None:
    # Execute / Assert
    assert (
        violations("import numpy as np\nnp.load('x', allow_pickle=False)\nimport json\njson.loads('1')") == []
    )


def test_no_pickle_anywhere_in_the_shipped_packages() -> None:
    # Prepare
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) >= 10

    # Execute
    found = {str(p.relative_to(ROOT)): v for p in files if (v := violations(p.read_text()))}

    # Assert
    assert found == {}


def _imported_packages(pkg: str) -> set[str]:
    """Top-level packages that the modules of ``pkg`` import (absolute imports)."""
    found: set[str] = set()
    for path in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_the_two_apps_do_not_import_each_other() -> None:
    # Execute / Assert: what they share lives in e3sfc_flower (records) or e3sfc_core
    assert "server_app" not in _imported_packages("client_app")
    assert "client_app" not in _imported_packages("server_app")
    assert not {"server_app", "client_app"} & _imported_packages("e3sfc_flower")
