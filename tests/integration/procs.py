"""Finding processes a test started, to prove that none is left behind."""

from __future__ import annotations

import os
from pathlib import Path


def flower_processes_mentioning(marker: Path) -> list[str]:
    """Command lines of live Flower processes whose environment mentions ``marker``
    (each test gives its processes a private FLWR_HOME, so this finds only ours)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(marker).encode() in env and ("flower" in cmd or "flwr" in cmd):
            out.append(cmd)
    return out
