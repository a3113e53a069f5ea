"""Certificates, node keys and SuperExec secrets for ``e3sfc-deploy``, apart from its process management."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

SUPERLINK_SANS = ("DNS:superlink", "DNS:localhost", "IP:127.0.0.1")
CERT_DAYS = 365
KEY_USAGE_FLAGS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


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


def generate_certs(
    out: Path, num_supernodes: int, extra_sans: Sequence[str] = (), backend: str = "auto"
) -> Certs:
    """Create (or complete) a certificate directory like ``docker/certs.sh`` does.

    ``backend``: ``"script"`` runs ``docker/certs.sh`` (needs bash, openssl, ssh-keygen),
    ``"python"`` uses the ``cryptography`` package (a dependency of flwr) to write the same
    files, ``"auto"`` prefers the script. Existing files are kept.

    Raises
    ------
    RuntimeError
        If the script fails or the chosen backend is not available.
    """
    out.mkdir(parents=True, exist_ok=True)
    script = certs_script()
    can_script = script.is_file() and all(shutil.which(t) for t in ("bash", "openssl", "ssh-keygen"))
    if backend == "script" or (backend == "auto" and can_script):
        if not can_script:
            raise RuntimeError(f"cannot run {script}: it needs bash, openssl and ssh-keygen")
        res = subprocess.run(
            ["bash", str(script), str(out), str(num_supernodes), *extra_sans],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"{script} failed ({res.returncode}): {res.stderr.strip()}")
    elif backend in ("auto", "python"):
        _generate_certs_python(out, num_supernodes, extra_sans)
    else:
        raise RuntimeError(f"unknown certificate backend {backend!r}")
    certs = Certs(out)
    if missing := certs.missing(num_supernodes):
        raise RuntimeError(f"certificate generation left out {', '.join(map(str, missing))}")
    return certs


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _cert_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    *,
    ca: bool,
    usages: Collection[str],
    now: dt.datetime,
) -> x509.CertificateBuilder:
    """The steps the CA and the SuperLink certificate share: names, key, a random serial,
    ``CERT_DAYS`` of validity from ``now`` (minus 5 minutes of clock skew), critical basic
    constraints and critical key usage with exactly the ``usages`` flags set (names from
    ``KEY_USAGE_FLAGS``). The caller adds its own extensions and signs."""
    from cryptography import x509

    if unknown := set(usages) - set(KEY_USAGE_FLAGS):
        raise ValueError(f"unknown key usage {', '.join(sorted(unknown))}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**{flag: flag in usages for flag in KEY_USAGE_FLAGS}), critical=True)
    )


def _generate_certs_python(out: Path, num_supernodes: int, extra_sans: Sequence[str]) -> None:
    """The recipe of ``docker/certs.sh`` with ``cryptography`` (EC P-384 everywhere)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pem, no_enc = serialization.Encoding.PEM, serialization.NoEncryption()
    now = dt.datetime.now(dt.UTC)
    certs = Certs(out)
    ca_key_path = out / "ca.key"

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    if not (certs.ca.is_file() and ca_key_path.is_file()):
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = name("E-3SFC Flower CA")
        ca_cert = (
            _cert_builder(
                ca_name, ca_name, ca_key.public_key(), ca=True, usages=("key_cert_sign", "crl_sign"), now=now
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        _write_private(ca_key_path, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_enc))
        certs.ca.write_bytes(ca_cert.public_bytes(pem))
        certs.server_cert.unlink(missing_ok=True)
    loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise RuntimeError(f"{ca_key_path} is not an EC key (made by another tool?)")
    ca_key = loaded
    ca_cert = x509.load_pem_x509_certificate(certs.ca.read_bytes())

    if not (certs.server_cert.is_file() and certs.server_key.is_file()):
        sans: list[x509.GeneralName] = []
        for entry in (*SUPERLINK_SANS, *extra_sans):
            kind, _, value = entry.partition(":")
            if kind == "IP":
                sans.append(x509.IPAddress(ipaddress.ip_address(value)))
            elif kind == "DNS":
                sans.append(x509.DNSName(value))
            else:
                raise RuntimeError(f"unsupported subjectAltName {entry!r} (use DNS:name or IP:address)")
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (
            _cert_builder(
                name("superlink"),
                ca_cert.subject,
                key.public_key(),
                ca=False,
                usages=("digital_signature", "key_encipherment"),
                now=now,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        _write_private(certs.server_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_enc))
        certs.server_cert.write_bytes(cert.public_bytes(pem))

    for i in range(num_supernodes):
        if not certs.node_secret(i).is_file():
            _write_private(certs.node_secret(i), os.urandom(32).hex().encode())
        if certs.node_key(i).is_file():
            continue
        node_key = ec.generate_private_key(ec.SECP384R1())  # = ssh-keygen -t ecdsa -b 384
        _write_private(
            certs.node_key(i), node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, no_enc)
        )
        public = node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        certs.node_pub(i).write_bytes(public + f" e3sfc-supernode-{i + 1}\n".encode())

    if not certs.superexec_secret.is_file():
        _write_private(certs.superexec_secret, os.urandom(32).hex().encode())
