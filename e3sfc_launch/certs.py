"""Certificates, node keys and SuperExec secrets for ``e3sfc-deploy``, apart from its process management."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The SuperLink certificate's fixed subjectAltNames, as docker/certs.sh writes them.
SUPERLINK_SANS = ("DNS:superlink", "DNS:localhost", "IP:127.0.0.1")


def certs_script() -> Path:
    """``docker/certs.sh``: the one place the certificate recipe is written down (in a
    wheel it may be shipped next to this module instead)."""
    here = Path(__file__).resolve().parent
    project = here.parent  # the Flower app (see ``deploy.app_dir``)
    for path in (project / "docker" / "certs.sh", here / "certs.sh"):
        if path.is_file():
            return path
    return project / "docker" / "certs.sh"


@dataclass(frozen=True)
class Certs:
    """The files ``docker/certs.sh`` writes into one directory."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def superexec_secret(self) -> Path:
        return self.root / "superexec.secret"

    def node_key(self, index: int) -> Path:
        """Private key of SuperNode ``index`` (0-based; files are numbered from 1)."""
        return self.root / f"supernode-{index + 1}"

    def node_secret(self, index: int) -> Path:
        """SuperExec authentication secret of SuperNode ``index`` and its ClientApp SuperExec."""
        return self.root / f"supernode-{index + 1}.secret"

    def node_pub(self, index: int) -> Path:
        """Public key (OpenSSH line) of SuperNode ``index`` (0-based)."""
        return self.root / f"supernode-{index + 1}.pub"

    def missing(self, num_supernodes: int) -> list[Path]:
        """Files a TLS + auth deployment of ``num_supernodes`` needs but that do not exist."""
        need = [self.ca, self.server_cert, self.server_key, self.superexec_secret]
        for i in range(num_supernodes):
            need += [self.node_key(i), self.node_pub(i), self.node_secret(i)]
        return [p for p in need if not p.is_file()]


def san_for(address_host: str) -> str:
    """A subjectAltName entry for a host name or IP address."""
    try:
        ipaddress.ip_address(address_host)
    except ValueError:
        return f"DNS:{address_host}"
    return f"IP:{address_host}"


def generate_certs(out: Path, num_supernodes: int, extra_sans: Sequence[str] = ()) -> Certs:
    """Create (or complete) a certificate directory by running ``docker/certs.sh``, the
    one implementation of the recipe (it needs bash, openssl and ssh-keygen). Existing
    files are kept.

    Raises
    ------
    RuntimeError
        If the script or one of its tools is missing, or the script fails.
    """
    out.mkdir(parents=True, exist_ok=True)
    script = certs_script()
    if not script.is_file():
        raise RuntimeError(f"{script} is missing")
    if missing_tools := [t for t in ("bash", "openssl", "ssh-keygen") if not shutil.which(t)]:
        raise RuntimeError(f"{script} needs {', '.join(missing_tools)} on PATH")
    res = subprocess.run(
        ["bash", str(script), str(out), str(num_supernodes), *extra_sans],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{script} failed ({res.returncode}): {res.stderr.strip()}")
    certs = Certs(out)
    if missing := certs.missing(num_supernodes):
        raise RuntimeError(f"certificate generation left out {', '.join(map(str, missing))}")
    return certs
