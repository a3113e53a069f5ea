"""``e3sfc-run``: run an experiment in Flower's simulation runtime and return when it ends.

It starts a private simulation SuperLink on a free loopback port, submits the app with
``flwr run --stream`` (so the per-round lines appear in the terminal), checks the run's
final status (exit code 1 if it did not complete), and stops the SuperLink and its
children by PID. Nothing keeps running afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .overrides import cli_overrides, to_flwr_run_config
from .processes import Managed, flower_env, free_port, wait_http_ok, write_connection

CONNECTION = "e3sfc-local"


def app_dir() -> Path:
    """The project directory (the Flower app: the folder with our pyproject.toml)."""
    return Path(__file__).resolve().parents[1]


def run_status(env: dict[str, str]) -> str:
    """Status of the (only) run on our private SuperLink, e.g. ``finished:completed``."""
    out = subprocess.run(
        ["flwr", "ls", CONNECTION, "--format", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return f"unknown ({out.stdout.strip() or out.stderr.strip()})"
    return str(runs[-1]["status"]) if runs else "no run was submitted"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="e3sfc-run", description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help='config overrides, e.g. method="topk"')
    parser.add_argument("--config", type=Path, help="TOML override file, e.g. conf/mnist-mlp.toml")
    parser.add_argument("--num-supernodes", type=int, default=10, help="simulated clients (default 10)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="Ray CPUs per client (default 1)")
    parser.add_argument(
        "--gpus-per-client", type=float, default=0.0, help="GPU fraction per client (default 0)"
    )
    parser.add_argument("--flwr-home", type=Path, default=Path(".flwr-home"), help="private Flower state dir")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="give up after this many seconds")
    args = parser.parse_args(argv)

    base = Path.cwd()
    overrides = cli_overrides("e3sfc-run", args.config, args.pairs, base, args.num_supernodes)
    if overrides is None:
        return 2
    home = args.flwr_home.resolve()
    env = flower_env(home, base)
    port = free_port()
    write_connection(home, CONNECTION, f"127.0.0.1:{port}")
    superlink = Managed(
        "flower-superlink",
        [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            ":flwr-in-memory:",
        ],
        env,
        home / "superlink.log",
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", 60, superlink)
        federation = (
            f"num-supernodes={args.num_supernodes} client-resources-num-cpus={args.cpus_per_client} "
            f"client-resources-num-gpus={args.gpus_per_client}"
        )
        cmd = [
            "flwr",
            "run",
            str(app_dir()),
            CONNECTION,
            "--stream",
            "--run-config",
            to_flwr_run_config(overrides),
            "--federation-config",
            federation,
        ]
        subprocess.run(cmd, env=env, timeout=args.timeout, check=False)
        status = run_status(env)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"e3sfc-run: {exc}", file=sys.stderr)
        return 1
    finally:
        superlink.stop()
    print(f"e3sfc-run: run status {status}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
