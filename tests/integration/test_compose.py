"""``docker-compose.yml`` checked by a real Compose parser (no Docker engine needed).

``docker-compose config`` (Debian's ``docker-compose`` package, or the Compose v2 plugin as
``docker compose``) resolves variables, anchors and merges and prints the effective
configuration, which these tests read back. Compose 1.29 prints every service with its
``profiles``; v2 prints only the active profile's services: both are handled.

The flags in the compose commands are also checked against ``--help`` of the installed
flwr 1.41 executables (the 1.30-era compose files use flags that 1.41 rejects).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
NUM_SUPERNODES = 3


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def _config(profile: str) -> dict[str, Any]:
    """Effective services of ``docker-compose.yml`` with ``profile`` active."""
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("no Compose binary: install Debian's docker-compose (apt-get install -y docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_VERSION", "E3SFC_", "COMPOSE_"))}
    res = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "--profile", profile, "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    config = yaml.safe_load(res.stdout)
    services = {
        name: svc
        for name, svc in config["services"].items()
        if not svc.get("profiles") or profile in svc["profiles"]
    }
    return {**config, "services": services}


def _args(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command") or []
    return command.split() if isinstance(command, str) else list(command)


def _flag(svc: dict[str, Any], name: str) -> str | None:
    """Value of ``--name=value`` / ``--name value`` in the service's command, None if absent."""
    args = _args(svc)
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """container path -> source, for short (1.29) and long (v2) volume syntax."""
    out = {}
    for vol in svc.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            out[parts[1]] = parts[0]
        else:
            out[vol["target"]] = str(vol.get("source", ""))
    return out


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = ((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return list(reservations.get("devices") or [])


def _by_image(services: dict[str, Any], image: str) -> dict[str, Any]:
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith(image)}


def _supernodes(services: dict[str, Any]) -> dict[str, Any]:
    return {n: s for n, s in _by_image(services, "flwr/supernode:").items()}


def _clientapps(services: dict[str, Any]) -> dict[str, Any]:
    return {
        n: s
        for n, s in services.items()
        if (_flag(s, "--runtime-api-address") or "").startswith("supernode-")
    }


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_topology_pins_flower_and_wires_every_supernode(profile: str) -> None:
    services = _config(profile)["services"]
    superlinks = {n: s for n, s in _by_image(services, "flwr/superlink:").items() if _flag(s, "--port")}
    assert list(superlinks) == ["superlink"]
    for svc in services.values():
        if "image" in svc and str(svc["image"]).startswith("flwr/"):
            assert svc["image"].endswith(":1.41.0"), svc["image"]
        if "build" in svc:
            assert svc["build"]["args"]["FLWR_VERSION"] == "1.41.0"
            assert svc["build"]["dockerfile"].endswith("docker/superexec.Dockerfile")
    superlink = services["superlink"]
    assert _flag(superlink, "--isolation") == "process"
    assert superlink["restart"] == "unless-stopped" and "healthcheck" in superlink
    # the ServerApp executor dials the SuperLink's runtime API over TLS
    serverapp = services["superexec-serverapp"]
    assert _flag(serverapp, "--runtime-api-address") == "superlink:8000"
    assert _flag(serverapp, "--root-certificates") == "certificates/ca.crt"
    assert "/app/outputs" in _mounts(serverapp) and "/app/data" in _mounts(serverapp)
    supernodes = _supernodes(services)
    assert len(supernodes) == NUM_SUPERNODES
    partitions = set()
    for svc in supernodes.values():
        node_config = _flag(svc, "--node-config") or ""
        pid = re.search(r"partition-id=(\d+)", node_config)
        assert pid is not None and f"num-partitions={NUM_SUPERNODES}" in node_config
        assert 'data-root="/app/data"' in node_config and 'state-dir="/app/state"' in node_config
        partitions.add(int(pid.group(1)))
        assert _flag(svc, "--isolation") == "process"
        assert svc["restart"] == "unless-stopped" and "healthcheck" in svc
    assert partitions == set(range(NUM_SUPERNODES))
    # one ClientApp executor per SuperNode, each with the dataset cache and its own state volume
    clientapps = _clientapps(services)
    targets = sorted((_flag(s, "--runtime-api-address") or "").split(":")[0] for s in clientapps.values())
    assert targets == sorted(supernodes)
    states = set()
    for svc in clientapps.values():
        mounts = _mounts(svc)
        assert "/app/data" in mounts and "/app/state" in mounts
        states.add(mounts["/app/state"])
        assert "healthcheck" in svc and svc["restart"] == "unless-stopped"
    assert len(states) == NUM_SUPERNODES


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_tls_and_supernode_auth_are_on(profile: str) -> None:
    services = _config(profile)["services"]
    superlink = services["superlink"]
    assert _flag(superlink, "--insecure") is None
    assert _flag(superlink, "--enable-supernode-auth") == ""
    cert_flags = {
        "--ssl-ca-certfile": "ca.crt",
        "--ssl-certfile": "server.pem",
        "--ssl-keyfile": "server.key",
    }
    mounts = _mounts(superlink)
    for flag, file in cert_flags.items():
        path = _flag(superlink, flag)
        assert path is not None and path.endswith(file), flag
        assert "/app/" + path in mounts and mounts["/app/" + path].endswith(file)
    for name, svc in _supernodes(services).items():
        assert _flag(svc, "--insecure") is None
        ca = _flag(svc, "--root-certificates")
        key = _flag(svc, "--auth-supernode-private-key")
        assert ca and key, name
        node_mounts = _mounts(svc)
        assert node_mounts["/app/" + ca].endswith("ca.crt")
        assert node_mounts["/app/" + key].endswith(name)  # its own private key
        assert _flag(svc, "--superlink") == "superlink:8000"
    # the registration job whitelists exactly the SuperNodes' public keys
    register = services["supernode-register"]
    script = " ".join(_args(register))
    pubs = sorted(src.rsplit("/", 1)[-1] for tgt, src in _mounts(register).items() if tgt.endswith(".pub"))
    assert pubs == [f"{n}.pub" for n in sorted(_supernodes(services))]
    assert "flwr supernode register" in script
    for name in _supernodes(services):
        assert register["depends_on"]["superlink"]["condition"] == "service_healthy"
        assert (
            services[name]["depends_on"]["supernode-register"]["condition"]
            == "service_completed_successfully"
        )


def test_gpu_variant_reserves_an_nvidia_gpu_per_clientapp() -> None:
    services = _config("gpu")["services"]
    clientapps = _clientapps(services)
    assert len(clientapps) == NUM_SUPERNODES
    for name, svc in clientapps.items():
        devices = _gpu_devices(svc)
        assert len(devices) == 1, name
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "pytorch.org/whl/cpu" not in svc["build"]["args"].get("TORCH_INDEX_URL", "")


def test_cpu_variant_has_no_gpu_reservation() -> None:
    services = _config("cpu")["services"]
    assert len(_clientapps(services)) == NUM_SUPERNODES
    for name, svc in services.items():
        assert _gpu_devices(svc) == [], name
        if "build" in svc:
            assert svc["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_compose_flags_exist_in_installed_flwr() -> None:
    """Every ``--flag`` in a compose command is accepted by that executable's --help."""
    raw = yaml.safe_load(COMPOSE.read_text())
    bindir = Path(sys.executable).parent
    helps: dict[str, str] = {}
    checked = 0
    for name, svc in raw["services"].items():
        entry = svc.get("entrypoint")
        image = str(svc.get("image", ""))
        if entry is not None:
            continue  # one-shot jobs with their own entrypoint
        exe = (
            "flower-superlink"
            if image.startswith("flwr/superlink")
            else "flower-supernode"
            if image.startswith("flwr/supernode")
            else "flower-superexec"
        )
        if exe not in helps:
            res = subprocess.run(
                [str(bindir / exe), "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "COLUMNS": "200"},
                check=False,
            )
            helps[exe] = res.stdout
        for arg in _args(svc):
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                assert re.search(rf"(^|[\s\[]){re.escape(flag)}[\s\]=]", helps[exe]), (
                    f"{name}: {exe} has no {flag}"
                )
                checked += 1
    assert checked > 30


def test_dockerfile_extends_superexec_and_selects_torch() -> None:
    text = (ROOT / "docker" / "superexec.Dockerfile").read_text()
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}$", text, re.M)
    assert re.search(r"^ARG FLWR_VERSION=1\.41\.0$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=", text, re.M)
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert "!= 'flwr'" in text  # the flwr dependency is dropped, the image's flwr is kept
