"""A real Flower deployment on loopback: SuperLink + 3 SuperNodes as separate processes,
TLS on, SuperNode authentication on (``e3sfc_launch.deploy``), no Ray.

The deployment is started once per module and stopped by PID afterwards (also when a
test fails); the teardown then checks that none of its processes is left.
"""

from __future__ import annotations

import csv
import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from e3sfc_launch.certs import generate_certs
from e3sfc_launch.deploy import Deployment, deployment, main, report_bytes
from e3sfc_launch.overrides import collect

from .procs import flower_processes_mentioning

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NUM_SUPERNODES = 3
RUN_TIMEOUT = 240.0
REFUSAL_TIMEOUT = 45.0


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Path]]:
    work = tmp_path_factory.mktemp("deployment")
    home = work / "fl" / "flwr-home"
    with deployment(work / "fl", NUM_SUPERNODES, base_dir=work, measure_wire=True) as dep:
        yield dep, work
    # every process was stopped by PID when the context ended; nothing may linger
    deadline = time.monotonic() + 20
    while flower_processes_mentioning(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert flower_processes_mentioning(home) == []


def test_topology_is_tls_with_node_auth(deployed: tuple[Deployment, Path]) -> None:
    dep, _ = deployed
    assert dep.certs is not None and dep.auth
    superlink = dep.argv["superlink"]
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
    assert "--ssl-certfile" in superlink
    for node in dep.supernodes:
        args = dep.argv[node.name]
        assert "--root-certificates" in args and "--auth-supernode-private-key" in args
    nodes = dep.nodes()
    assert sum(n["status"] == "online" for n in nodes) == NUM_SUPERNODES
    # a TLS client that does not trust our CA is refused
    url = f"https://{dep.superlink_address}"
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(f"{url}/health", timeout=5, context=ssl.create_default_context())  # noqa: S310
    assert isinstance(untrusted.value.reason, ssl.SSLError)
    # the runtime API (same port) only serves SuperExecs that hold the shared secret
    trusted = ssl.create_default_context(cafile=str(dep.certs.ca))
    request = urllib.request.Request(
        f"{url}/v1/runtime/acquire-task", data=b"", headers={"Content-Type": "application/protobuf"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5, context=trusted)  # noqa: S310
    assert refused.value.code == 401


def test_three_rounds_complete_and_accuracy_rises(deployed: tuple[Deployment, Path]) -> None:
    # Prepare
    dep, work = deployed
    overrides = collect(None, ["num-rounds=3", 'output-dir="out"', 'run-name="deployed"'], work)
    overrides["num-partitions"] = NUM_SUPERNODES
    log = work / "flwr-run.log"
    assert dep.wire is not None
    dep.wire.reset()
    # Execute
    run = dep.submit(overrides, timeout=RUN_TIMEOUT, stream_to=log)
    wire = dep.wire.reset()
    report_bytes(overrides, run.get("network-traffic") or {}, wire)
    # Assert
    assert run.get("status") == "finished:completed", log.read_text(errors="replace")[-4000:]
    run_dir = work / "out" / "deployed"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["accuracy"]) > float(rows[0]["accuracy"])
    for name in ("metrics.csv", "summary.json", "accuracy.png"):
        assert (run_dir / name).stat().st_size > 0, name
    streamed = log.read_text(errors="replace")
    assert "round   3 |" in streamed
    # the three byte levels, each direction: what we count <= Flower's own accounting of
    # the run's messages <= what the SuperNodes' connections carried; all in summary.json
    levels = json.loads((run_dir / "summary.json").read_text())["bytes_by_level"]
    assert levels["counted"]["uplink"] == sum(int(r["uplink_bytes"]) for r in rows) > 0
    assert levels["counted"]["downlink"] == sum(int(r["downlink_bytes"]) for r in rows) > 0
    assert levels["flower_messages"]["uplink"] == run["network-traffic"]["inbound-bytes"]
    for direction in ("uplink", "downlink"):
        counted, flower, on_wire = (levels[k][direction] for k in ("counted", "flower_messages", "wire"))
        assert counted < flower < on_wire, direction


def test_supernode_with_unregistered_key_is_refused(deployed: tuple[Deployment, Path]) -> None:
    # Prepare: a key pair the SuperLink has never seen
    dep, work = deployed
    rogue_dir = generate_certs(work / "rogue", 1).root
    online_before = {n["node-id"] for n in dep.nodes() if n["status"] == "online"}
    # Execute
    rogue = dep.start_supernode(0, NUM_SUPERNODES, private_key=rogue_dir / "supernode-1", name="rogue")
    try:
        deadline = time.monotonic() + REFUSAL_TIMEOUT
        while rogue.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        # Assert: it gave up with an error, or at least never joined
        if not rogue.alive():
            assert rogue.proc.returncode != 0
        online_after = {n["node-id"] for n in dep.nodes() if n["status"] == "online"}
        assert online_after == online_before
        assert len(online_after) == NUM_SUPERNODES
    finally:
        rogue.stop(grace=5)
    assert "Failed to activate" in rogue.tail(50) or "2004" in rogue.tail(50)


def test_compose_registration_job_is_idempotent(deployed: tuple[Deployment, Path]) -> None:
    """The ``supernode-register`` script of docker-compose.yml, run against this SuperLink:
    two keys are already registered (accepted as such), the third is new."""
    dep, work = deployed
    assert dep.certs is not None
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    script = compose["services"]["supernode-register"]["command"][0].replace("$$", "$")
    fresh = generate_certs(work / "compose-new", 1).node_pub(0)
    for old, new in {
        "/tmp/flwr": str(work / "compose-flwr-home"),
        "superlink:8000": dep.superlink_address,
        "/app/certificates/ca.crt": str(dep.certs.ca),
        "/app/keys/supernode-1.pub": str(dep.certs.node_pub(0)),
        "/app/keys/supernode-2.pub": str(dep.certs.node_pub(1)),
        "/app/keys/supernode-3.pub": str(fresh),
    }.items():
        assert old in script
        script = script.replace(old, new)
    res = subprocess.run(["sh", "-c", script], env=dep.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("registered ") == 3
    # and a key that is not an OpenSSH EC public key makes the job fail
    bad = work / "bad.pub"
    bad.write_text("not a key\n")
    res = subprocess.run(
        ["sh", "-c", script.replace(str(fresh), str(bad))],
        env=dep.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0


def test_certificates_have_the_layout_and_sans_deploy_expects(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path, 2, ["IP:10.1.2.3", "DNS:fl.example.org"])
    assert certs.missing(2) == []
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"superlink", "localhost", "fl.example.org"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    ssl.create_default_context(cafile=str(certs.ca))  # loads as a trust anchor
    key = serialization.load_ssh_private_key(certs.node_key(0).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size == 384
    assert certs.node_pub(0).read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct(certs.node_key(0).stat().st_mode & 0o777) == "0o600"


def test_sigterm_stops_every_process_it_started(tmp_path: Path) -> None:
    # Prepare: the launcher as a process, one SuperNode (the run waits for a second one)
    work = tmp_path / "fl"
    log = (tmp_path / "deploy.log").open("wb")
    cmd = [
        sys.executable,
        "-m",
        "e3sfc_launch.deploy",
        "--num-supernodes",
        "1",
        "--workdir",
        str(work),
        "num-rounds=1",
        'output-dir="out"',
    ]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    home = work / "flwr-home"
    try:
        deadline = time.monotonic() + 90
        while not (work / "logs" / "superexec-supernode-1.log").exists() and time.monotonic() < deadline:
            assert launcher.poll() is None, (tmp_path / "deploy.log").read_text()
            time.sleep(0.3)
        assert flower_processes_mentioning(home), "the deployment did not come up"
        # Execute
        launcher.send_signal(signal.SIGTERM)
        rc = launcher.wait(timeout=60)
        # Assert
        assert rc == 128 + signal.SIGTERM
        deadline = time.monotonic() + 20
        while flower_processes_mentioning(home) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert flower_processes_mentioning(home) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        log.close()


def test_bad_config_fails_before_anything_starts(tmp_path: Path) -> None:
    assert main(["no-such-key=1", "--workdir", str(tmp_path)]) == 2
    assert main(['method="zip"', "--workdir", str(tmp_path)]) == 2
    assert not (tmp_path / "logs").exists()
