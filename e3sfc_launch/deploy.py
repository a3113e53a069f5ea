"""``e3sfc-deploy``: run an experiment on a real Flower deployment (no Docker, no Ray).

It starts the topology of ``docker-compose.yml`` as local processes: one SuperLink, N
SuperNodes (each with its own runtime port and ``partition-id=i num-partitions=N``) and,
in ``process`` isolation (the default, as in the compose file), one SuperExec for the
ServerApp and one per SuperNode. **TLS and SuperNode authentication are on by default**:
certificates and node keys are made by ``docker/certs.sh`` (the one implementation of
the recipe; it needs openssl and ssh-keygen), the node public keys are registered with
``flwr supernode register``, and only then do the SuperNodes start. The run is submitted
with ``flwr run --stream``; its final status comes from ``flwr ls``. Every process this
launcher started is stopped by PID when it returns, also on errors, Ctrl-C and SIGTERM.

Exit codes: 0 run ``finished:completed``; 1 the run failed or a process did not come
up; 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e3sfc_core.config import ExperimentConfig
from e3sfc_core.experiment import run_name

from .certs import SUPERLINK_SANS, Certs, generate_certs, san_for
from .overrides import cli_overrides, to_flwr_run_config
from .processes import Managed, flower_env, free_port, wait_http_ok, write_connection
from .wire import WireCounter, byte_levels, levels_text, record_levels

log = logging.getLogger("e3sfc-deploy")

CONNECTION = "e3sfc-deploy"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 90.0
CLI_TIMEOUT = 120.0


def app_dir() -> Path:
    """The project directory (the Flower app: the folder with our pyproject.toml)."""
    return Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the topology


@dataclass
class Deployment:
    """Processes of one local deployment plus what is needed to talk to it."""

    workdir: Path
    env: dict[str, str]
    superlink_address: str  # host:port the SuperNodes and the CLI use
    certs: Certs | None  # None: --insecure
    auth: bool
    isolation: str
    connection: str = CONNECTION
    client_threads: int | None = None  # OMP/MKL threads of each ClientApp process
    processes: list[Managed] = field(default_factory=list)
    supernodes: list[Managed] = field(default_factory=list)
    wire: WireCounter | None = None  # counts the SuperNodes' traffic when they dial through it
    argv: dict[str, list[str]] = field(default_factory=dict)  # command line by process name

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    # -- CLI ----------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against our connection's FLWR_HOME."""
        return subprocess.run(
            ["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def flwr_json(self, *args: str) -> dict[str, Any]:
        """``flwr ARGS --format json`` parsed; ``{}`` when the output is not JSON."""
        res = self.flwr(*args, "--format", "json")
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            log.debug("flwr %s: %s %s", " ".join(args), res.stdout, res.stderr)
            return {}
        return data if isinstance(data, dict) else {}

    def register(self, *public_keys: Path) -> None:
        """``flwr supernode register`` for each key (in parallel): allow the SuperNodes
        holding the private halves to join.

        Raises
        ------
        RuntimeError
            If the SuperLink refused a key.
        """
        procs = [
            (
                key,
                subprocess.Popen(
                    ["flwr", "supernode", "register", str(key), self.connection, "--format", "json"],
                    env=self.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for key in public_keys
        ]
        errors = []
        for key, proc in procs:
            try:
                out, err = proc.communicate(timeout=CLI_TIMEOUT)
            except subprocess.TimeoutExpired:
                for _, other in procs:
                    other.kill()
                    other.communicate()
                raise
            try:
                ok = bool(json.loads(out).get("success"))
            except json.JSONDecodeError:
                ok = False
            if proc.returncode != 0 or not ok:
                errors.append(f"registering {key} failed: {out.strip()} {err.strip()}")
        if errors:
            raise RuntimeError("\n".join(errors))

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` rows (``node-id``, ``status``, ...)."""
        return list(self.flwr_json("supernode", "list", self.connection).get("nodes", []))

    def wait_online(self, count: int, timeout: float = STARTUP_TIMEOUT) -> list[dict[str, Any]]:
        """Wait until ``count`` SuperNodes are ``online``; fail early if one of ours died.

        Raises
        ------
        RuntimeError
            On timeout or when a SuperNode process exited.
        """
        deadline = time.monotonic() + timeout
        online: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            for proc in self.processes:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.tail()}")
            online = [n for n in self.nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return online
            time.sleep(0.5)
        raise RuntimeError(f"only {len(online)} of {count} SuperNodes came online within {timeout:.0f} s")

    def runs(self) -> list[dict[str, Any]]:
        """``flwr ls`` rows of every run on this SuperLink."""
        return list(self.flwr_json("ls", self.connection).get("runs", []))

    def run_info(self, run_id: int | None = None) -> dict[str, Any]:
        """``flwr ls`` row of run ``run_id`` (default: the latest); ``{}`` if none."""
        runs = self.runs()
        if run_id is not None:
            runs = [r for r in runs if str(r.get("run-id")) == str(run_id)]
        return runs[-1] if runs else {}

    def run_status(self, run_id: int | None = None) -> str:
        """Status of run ``run_id`` (default: the latest), e.g. ``finished:completed``."""
        return str(self.run_info(run_id).get("status", "no run was submitted"))

    def submit(
        self, overrides: dict[str, Any], *, timeout: float, stream_to: Path | None = None
    ) -> dict[str, Any]:
        """``flwr run <app> <connection> --stream`` and wait for its end; returns the run's
        ``flwr ls`` row (``run-id``, ``status``, ``network-traffic``, ...), ``{}`` if no run
        was created. With ``stream_to`` the streamed output goes to that file, else to stdout.
        """
        cmd = [
            "flwr",
            "run",
            str(app_dir()),
            self.connection,
            "--stream",
            "--run-config",
            to_flwr_run_config(overrides),
        ]
        before = {str(r.get("run-id")) for r in self.runs()}
        if stream_to is None:
            subprocess.run(cmd, env=self.env, timeout=timeout, check=False)
        else:
            stream_to.parent.mkdir(parents=True, exist_ok=True)
            with stream_to.open("ab") as fh:
                subprocess.run(
                    cmd, env=self.env, timeout=timeout, check=False, stdout=fh, stderr=subprocess.STDOUT
                )
        new = [r for r in self.runs() if str(r.get("run-id")) not in before]
        return new[-1] if new else {}

    # -- processes ------------------------------------------------------------------------

    def _client_env(self) -> dict[str, str]:
        """Environment of a SuperNode's processes: on one host the ClientApps share the
        cores, so each gets ``client_threads`` BLAS/OpenMP threads (as Ray does in simulation)."""
        env = dict(self.env)
        if self.client_threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env.setdefault(var, str(self.client_threads))
        return env

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Managed:
        proc = Managed(name, argv, env or self.env, self.logs / f"{name}.log")
        self.processes.append(proc)
        self.argv[name] = list(argv)
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def _tls_client_args(self) -> list[str]:
        return ["--insecure"] if self.certs is None else ["--root-certificates", str(self.certs.ca)]

    def _superexec_auth_args(self, node: int | None = None) -> list[str]:
        """SuperExec authentication (process isolation): one secret for the SuperLink side,
        one per SuperNode."""
        if self.isolation != "process" or self.certs is None:
            return []
        secret = self.certs.superexec_secret if node is None else self.certs.node_secret(node)
        return ["--superexec-auth-secret-file", str(secret)]

    def start_superlink(self, host: str, port: int) -> Managed:
        """The SuperLink (Fleet + Control + Runtime API on one port) and, in process
        isolation, the SuperExec that runs ServerApps."""
        argv = [
            "flower-superlink",
            "--host",
            host,
            "--port",
            str(port),
            "--isolation",
            self.isolation,
            "--database",
            ":flwr-in-memory:",
            "--disable-runtime-dependency-installation",
        ]
        if self.certs is None:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-ca-certfile",
                str(self.certs.ca),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
            ]
        if self.auth:
            argv.append("--enable-supernode-auth")
        argv += self._superexec_auth_args()
        proc = self._start("superlink", argv)
        scheme, context = (
            ("http", None)
            if self.certs is None
            else ("https", ssl.create_default_context(cafile=str(self.certs.ca)))
        )
        wait_http_ok(f"{scheme}://{self.superlink_address}/health", STARTUP_TIMEOUT, proc, context=context)
        if self.isolation == "process":
            self._start(
                "superexec-serverapp",
                [
                    "flower-superexec",
                    "--runtime-api-address",
                    self.superlink_address,
                    *self._tls_client_args(),
                    *self._superexec_auth_args(),
                ],
            )
        return proc

    def start_supernode(
        self,
        index: int,
        num_partitions: int,
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        private_key: Path | None = None,
        extra_node_config: dict[str, str] | None = None,
        name: str | None = None,
        superlink: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> Managed:
        """SuperNode ``index`` (``partition-id=index``) with its own runtime port and, in
        process isolation, its SuperExec for ClientApps. ``private_key`` defaults to the
        node's key in the certificate directory when authentication is on; ``superlink``
        overrides the address it dials (e.g. a byte-counting proxy)."""
        port = port or free_port(host)
        name = name or f"supernode-{index + 1}"
        node_config = {"partition-id": str(index), "num-partitions": str(num_partitions)}
        node_config.update(extra_node_config or {})
        argv = [
            "flower-supernode",
            "--superlink",
            superlink or self.superlink_address,
            "--host",
            host,
            "--port",
            str(port),
            "--isolation",
            self.isolation,
            "--node-config",
            " ".join(f"{k}={v}" for k, v in node_config.items()),
            *self._tls_client_args(),
            *self._superexec_auth_args(index),
            *extra_args,
        ]
        if private_key is None and self.auth and self.certs is not None:
            private_key = self.certs.node_key(index)
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        proc = self._start(name, argv, self._client_env())
        self.supernodes.append(proc)
        if self.isolation == "process":
            # The SuperNode's own runtime API is plain HTTP on loopback (as in the compose
            # file, where it stays on the internal network); the shared secret authenticates.
            self._start(
                f"superexec-{name}",
                [
                    "flower-superexec",
                    "--runtime-api-address",
                    f"{LOOPBACK if host in ('0.0.0.0', '::') else host}:{port}",
                    "--insecure",
                    *self._superexec_auth_args(index),
                ],
                self._client_env(),
            )
        return proc

    def stop(self) -> None:
        """Stop every process we started by PID: SuperExecs and SuperNodes first (newest
        first), the SuperLink last."""
        for proc in reversed(self.processes):
            with suppress(Exception):
                proc.stop(grace=10.0)
        self.processes.clear()
        self.supernodes.clear()


def toml_string(value: str) -> str:
    """A TOML string for ``--node-config`` (literal string unless it holds a quote)."""
    return f"'{value}'" if "'" not in value else json.dumps(value)


@contextmanager
def deployment(
    workdir: Path,
    num_supernodes: int,
    *,
    base_dir: Path | None = None,
    host: str = LOOPBACK,
    port: int = 0,
    advertise: str | None = None,
    tls: bool = True,
    auth: bool = True,
    isolation: str = "process",
    certs_dir: Path | None = None,
    extra_sans: Sequence[str] = (),
    node_config: dict[str, str] | None = None,
    supernode_host: str = LOOPBACK,
    client_threads: int | None = None,
    start_supernodes: bool = True,
    measure_wire: bool = False,
) -> Iterator[Deployment]:
    """Start a SuperLink (+ SuperExec) and ``num_supernodes`` registered SuperNodes, wait
    until all are online, yield, then stop every process by PID (also on errors).

    ``advertise`` is the host the SuperNodes and the CLI dial (default: ``host``, or
    127.0.0.1 when binding to all interfaces); it is added to the certificate's SANs.
    ``measure_wire`` puts a byte-counting relay (``dep.wire``) between the SuperNodes and
    the SuperLink.
    """
    if auth and not tls:
        raise ValueError("SuperNode authentication needs TLS (flower-superlink refuses it without)")
    workdir = workdir.resolve()
    port = port or free_port(LOOPBACK if host in ("0.0.0.0", "::") else host)
    dial = advertise or (LOOPBACK if host in ("0.0.0.0", "::") else host)
    certs = None
    if tls:
        sans = list(extra_sans)
        if f"{san_for(dial)}" not in (*SUPERLINK_SANS, *sans):
            sans.append(san_for(dial))
        certs = generate_certs(certs_dir or workdir / "certs", num_supernodes, sans)  # keeps existing files
    home = workdir / "flwr-home"
    env = flower_env(home, (base_dir or Path.cwd()).resolve())
    write_connection(home, CONNECTION, f"{dial}:{port}", root_certificates=certs.ca if certs else None)
    if client_threads is None:  # share this host's cores between the SuperNodes' ClientApps
        client_threads = max(1, (os.cpu_count() or 1) // num_supernodes)
    dep = Deployment(workdir, env, f"{dial}:{port}", certs, auth, isolation, client_threads=client_threads)
    try:
        dep.start_superlink(host, port)
        if measure_wire:
            dep.wire = WireCounter((dial, port))
        if start_supernodes:
            if auth and certs is not None:
                dep.register(*(certs.node_pub(i) for i in range(num_supernodes)))
            via = dep.wire.address if dep.wire is not None else None
            for i in range(num_supernodes):
                dep.start_supernode(
                    i, num_supernodes, host=supernode_host, extra_node_config=node_config, superlink=via
                )
            dep.wait_online(num_supernodes)
        yield dep
    finally:
        dep.stop()
        if dep.wire is not None:
            dep.wire.close()


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``e3sfc-deploy``."""
    p = argparse.ArgumentParser(
        prog="e3sfc-deploy",
        description=__doc__.splitlines()[0],
        epilog="Example: e3sfc-deploy --num-supernodes 3 num-rounds=5",
    )
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="run-config overrides, e.g. num-rounds=5")
    p.add_argument("--config", type=Path, help="TOML override file, e.g. conf/mnist-mlp.toml")
    p.add_argument("--num-supernodes", type=int, default=3, help="SuperNodes = partitions (default 3)")
    p.add_argument("--host", default=LOOPBACK, help="SuperLink bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    p.add_argument("--advertise", help="host SuperNodes/CLI dial (default: --host, or 127.0.0.1 for 0.0.0.0)")
    p.add_argument("--supernode-host", default=LOOPBACK, help="SuperNodes' runtime API bind address")
    p.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="DNS:x|IP:y",
        help="extra subjectAltName for the SuperLink certificate (repeatable)",
    )
    p.add_argument(
        "--certs", type=Path, help="use (or complete) this certificate directory (certs.sh layout)"
    )
    p.add_argument(
        "--isolation",
        choices=("process", "subprocess"),
        default="process",
        help="process: explicit SuperExecs as in docker-compose.yml (default); "
        "subprocess: SuperLink/SuperNodes spawn their own",
    )
    p.add_argument("--data-root", type=Path, help="node-config data-root for every SuperNode")
    p.add_argument(
        "--state-dir", type=Path, help="node-config state-dir (client residuals) for every SuperNode"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(".flwr-home/deploy"),
        help="FLWR_HOME, certificates and process logs (default .flwr-home/deploy)",
    )
    p.add_argument(
        "--client-threads",
        type=int,
        default=None,
        help="OMP/MKL threads per ClientApp (default: cores // SuperNodes; 0 = leave unset)",
    )
    p.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication (unsafe)")
    p.add_argument("--no-auth", action="store_true", help="TLS but any SuperNode may join (unsafe)")
    p.add_argument(
        "--timeout", type=float, default=6 * 3600, help="give up on the run after this many seconds"
    )
    p.add_argument(
        "--measure-wire",
        action="store_true",
        help="route the SuperNodes through a byte-counting relay on 127.0.0.1 and report wire bytes",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log process commands")
    return p


def report_bytes(overrides: dict[str, Any], traffic: dict[str, Any], wire: tuple[int, int] | None) -> None:
    """Print the run's bytes on three levels and add them to its ``summary.json``."""
    run_dir = Path(overrides["output-dir"]) / run_name(ExperimentConfig.from_run_config(overrides))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    levels = byte_levels(summary, traffic, wire)
    print("e3sfc-deploy: bytes of the run (SuperNodes -> SuperLink up, back down):")
    for line in levels_text(levels):
        print(f"e3sfc-deploy: {line}")
    if summary:
        record_levels(summary_path, levels)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="e3sfc-deploy: %(message)s"
    )
    if args.num_supernodes < 1:
        print("e3sfc-deploy: --num-supernodes must be at least 1", file=sys.stderr)
        return 2
    base = Path.cwd()
    overrides = cli_overrides("e3sfc-deploy", args.config, args.pairs, base, args.num_supernodes)
    if overrides is None:
        return 2
    if args.insecure:
        log.warning(
            "--insecure: TLS and SuperNode authentication are OFF; traffic is unencrypted and any "
            "process that reaches the SuperLink may join or submit runs. Use only for debugging."
        )
    elif args.no_auth:
        log.warning(
            "--no-auth: SuperNode authentication is OFF; any SuperNode that reaches the SuperLink may join."
        )
    node_config: dict[str, str] = {}
    for key, path in (("data-root", args.data_root), ("state-dir", args.state_dir)):
        if path is not None:
            node_config[key] = toml_string(str(path.expanduser().resolve()))
    status = "not started"

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through deployment(): every process is stopped

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        with deployment(
            args.workdir,
            args.num_supernodes,
            base_dir=base,
            host=args.host,
            port=args.port,
            advertise=args.advertise,
            tls=not args.insecure,
            auth=not (args.insecure or args.no_auth),
            isolation=args.isolation,
            certs_dir=args.certs,
            extra_sans=args.san,
            node_config=node_config,
            supernode_host=args.supernode_host,
            client_threads=args.client_threads,
            measure_wire=args.measure_wire,
        ) as dep:
            if dep.wire is not None:
                dep.wire.reset()  # the run's traffic only, not the start-up's
            run = dep.submit(overrides, timeout=args.timeout)
            status = str(run.get("status", "no run was submitted"))
            wire = dep.wire.reset() if dep.wire is not None else None
            report_bytes(overrides, run.get("network-traffic") or {}, wire)
    except KeyboardInterrupt:
        print("e3sfc-deploy: interrupted; every process was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"e3sfc-deploy: {exc}", file=sys.stderr)
        print(f"e3sfc-deploy: process logs in {args.workdir.resolve() / 'logs'}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"e3sfc-deploy: run status {status}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
