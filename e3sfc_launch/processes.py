"""Start Flower processes, wait until they serve, and stop exactly the ones we started.

Every process gets its own session (process group), so stopping it also stops the
children it spawned (``flower-superexec``, ServerApp/ClientApp processes), and nothing
is left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, base_dir: Path) -> dict[str, str]:
    """Environment for Flower processes: isolated FLWR_HOME, no telemetry, no update
    check, no per-run dependency install (our dependencies are already installed), and
    this interpreter's scripts first on PATH (SuperLinks spawn ``flower-superexec``)."""
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        E3SFC_BASE_DIR=str(base_dir),
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    return env


class Managed:
    """A background process in its own process group, logged to a file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            list(argv), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        """The process ID (also its process-group ID)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                # the leader is gone; make sure its group is too
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        self._log.close()

    def tail(self, lines: int = 30) -> str:
        """The end of the process log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_http_ok(
    url: str, timeout: float, proc: Managed | None = None, context: ssl.SSLContext | None = None
) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``proc`` died.

    Raises
    ------
    RuntimeError
        On timeout or when the process exited, with the end of its log.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:  # noqa: S310 (loopback)
                if 200 <= resp.status < 300:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    tail = proc.tail() if proc is not None else ""
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s\n{tail}")


def write_connection(
    flwr_home: Path, name: str, address: str, *, root_certificates: Path | None = None
) -> None:
    """Write a Flower CLI config with one SuperLink connection (our FLWR_HOME is ours
    alone, so the whole file is rewritten)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates.resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")
