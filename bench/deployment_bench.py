"""Deployed vs simulated wall time per round, and Flower's bytes vs our payload bytes.

    .venv/bin/python bench/deployment_bench.py --rounds 5 --out /tmp/e3sfc-bench

1. Simulation: ``e3sfc-run --num-supernodes 3`` (Ray, one process).
2. Deployment: ``e3sfc_launch.deploy.deployment`` (SuperLink + 3 SuperNodes + SuperExecs,
   TLS + SuperNode auth, loopback), with the SuperNodes dialling the SuperLink through a
   byte-counting TCP relay, so the Fleet traffic is measured on the wire (TLS records,
   HTTP, request signatures, polling included). Flower's own per-run accounting
   (``flwr ls --format json`` -> ``network-traffic``: protobuf bytes of the Fleet
   messages and objects of that run) is read as well.

Per-round wall time is taken from the streamed ``round N |`` lines (time between
consecutive lines; round 1 from the ``initial model`` line). Our payload bytes come from
``metrics.csv`` (uplink_bytes, downlink_bytes). Results: ``<out>/results.json`` (with
``--save NAME`` also ``bench/results/deployment_NAME.json``) and a table on stdout. Same
config for both runs; nothing but loopback is used. ``--compare A,B,...`` measures nothing:
it renders saved runs side by side as ``bench/results/deployment_compare.md``.

``--app floor`` deploys ``bench/floor-app`` instead (the same topology, relay, TLS and node
authentication; nothing simulated): a Flower app without a model whose rounds send
``payload-bytes=N`` random bytes each way after ``client-seconds=S`` of client work, so
its rows are what a deployed round costs in Flower itself.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import parse_overrides
from bench.report import RESULTS, Report, Table, env_info, env_markdown, save_json
from e3sfc_launch.deploy import app_dir, deployment
from e3sfc_launch.overrides import collect, to_flwr_run_config

FLOOR_APP = Path(__file__).resolve().parent / "floor-app"  # empty messages, flwr only
ROUND_LINE = re.compile(r"^round\s+(\d+) \|")
IDLE_SECONDS = 15.0


def stream_rounds(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd``, tee its output to ``log``, timestamp the initial-model and round lines."""
    start = time.monotonic()
    marks: dict[int, float] = {}
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - start
            fh.write(line)
            if line.startswith("initial model"):
                marks[0] = now
            elif m := ROUND_LINE.match(line):
                marks[int(m.group(1))] = now
            if now > timeout:
                proc.kill()
                break
        rc = proc.wait()
    total = time.monotonic() - start
    rounds = sorted(k for k in marks if k > 0)
    per_round = [marks[r] - marks.get(r - 1, marks.get(0, 0.0)) for r in rounds]
    return {"rc": rc, "wall_total_s": total, "first_round_line_s": marks.get(1), "per_round_s": per_round}


def metrics(run_dir: Path) -> dict[str, Any]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "rounds": len(rows),
        "uplink_bytes": sum(int(r["uplink_bytes"]) for r in rows),
        "downlink_bytes": sum(int(r["downlink_bytes"]) for r in rows),
        "uplink_messages": sum(int(r["sampled"]) for r in rows),
        "downlink_messages": sum(int(r["sampled"]) for r in rows),
        "final_accuracy": float(rows[-1]["accuracy"]),
        "strategy_wall_s": summary.get("wall_seconds"),
    }


def run_simulation(out: Path, pairs: list[str], nodes: int, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "e3sfc_launch.run",
        "--num-supernodes",
        str(nodes),
        "--flwr-home",
        str(out / "sim-flwr-home"),
        *pairs,
        f'output-dir="{out}"',
        'run-name="simulated"',
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = stream_rounds(cmd, env, out / "simulated.log", timeout)
    res.update(metrics(out / "simulated"))
    return res


def our_run_config(out: Path, pairs: list[str], nodes: int) -> str:
    overrides = collect(None, [*pairs, f'output-dir="{out}"', 'run-name="deployed"'], out)
    overrides["num-partitions"] = nodes
    return to_flwr_run_config(overrides)


def floor_metrics(rounds: int, nodes: int, payload: int, per_round: list[float]) -> dict[str, Any]:
    """What the floor app sent: one message of ``payload`` bytes each way per node and round."""
    messages = rounds * nodes
    return {
        "rounds": rounds,
        "uplink_bytes": payload * messages,
        "downlink_bytes": payload * messages,
        "uplink_messages": messages,
        "downlink_messages": messages,
        "final_accuracy": None,
        "strategy_wall_s": sum(per_round),
    }


def run_deployment(out: Path, app: Path, run_config: str, nodes: int, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    with deployment(out / "deploy", nodes, base_dir=out, measure_wire=True) as dep:
        relay = dep.wire
        assert relay is not None
        startup = time.monotonic() - t0
        relay.reset()
        time.sleep(IDLE_SECONDS)  # what idle, connected SuperNodes exchange
        idle_up, idle_down = relay.reset()
        cmd = ["flwr", "run", str(app), dep.connection, "--stream", "--run-config", run_config]
        res = stream_rounds(cmd, dep.env, out / "deployed.log", timeout)
        wire_up, wire_down = relay.reset()
        info = dep.run_info()
    res.update(
        startup_s=startup,
        status=info.get("status"),
        flower_accounting=info.get("network-traffic"),
        wire_up_bytes=wire_up,
        wire_down_bytes=wire_down,
        idle_wire_up_bytes_per_s=idle_up / IDLE_SECONDS,
        idle_wire_down_bytes_per_s=idle_down / IDLE_SECONDS,
        relay_connections=relay.connections,
    )
    return res


def fab_size(out: Path, app: Path) -> int:
    """Bytes of the FAB that ``flwr run`` uploads and every SuperNode downloads once."""
    build = out / f"fab-{app.name}"
    build.mkdir(exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(out / "fab-flwr-home")}
    subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "build", "--app", str(app)],
        cwd=build,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return max(f.stat().st_size for f in build.glob("*.fab"))


def overheads(dep: dict[str, Any], fab: int, nodes: int) -> dict[str, float]:
    """Bytes Flower moved beyond our payload, per message: Flower's protobuf accounting,
    and on the wire (everything, then without idle polling and the per-node FAB download)."""
    n_up, n_down = dep["uplink_messages"], dep["downlink_messages"]
    acct = dep["flower_accounting"] or {}
    run_s = dep["wall_total_s"]
    idle_up = dep["idle_wire_up_bytes_per_s"] * run_s
    idle_down = dep["idle_wire_down_bytes_per_s"] * run_s
    return {
        "protobuf_up_per_msg": (acct.get("inbound-bytes", 0) - dep["uplink_bytes"]) / n_up,
        "protobuf_down_per_msg": (acct.get("outbound-bytes", 0) - dep["downlink_bytes"]) / n_down,
        "wire_up_per_msg": (dep["wire_up_bytes"] - dep["uplink_bytes"]) / n_up,
        "wire_down_per_msg": (dep["wire_down_bytes"] - dep["downlink_bytes"]) / n_down,
        "idle_up_during_run": idle_up,
        "idle_down_during_run": idle_down,
        "fab_downloads": fab * nodes,
        "wire_up_per_msg_excl_idle": (dep["wire_up_bytes"] - idle_up - dep["uplink_bytes"]) / n_up,
        "wire_down_per_msg_excl_idle_fab": (
            dep["wire_down_bytes"] - idle_down - fab * nodes - dep["downlink_bytes"]
        )
        / n_down,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save", help="also write bench/results/deployment_<SAVE>.json")
    p.add_argument(
        "--compare",
        help="comma-separated saved names: write bench/results/deployment_compare.md and stop",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--app",
        choices=("e3sfc", "floor"),
        default="e3sfc",
        help="floor: bench/floor-app (messages of payload-bytes=N bytes, client-seconds=S of client "
        "work, no model), deployed only",
    )
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/e3sfc-bench"))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("pairs", nargs="*", help="extra run-config overrides for both runs")
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One simulated and one deployed run of the same config (``<out>/results.json``)."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pairs = [f"num-rounds={args.rounds}", *args.pairs]
    app = FLOOR_APP if args.app == "floor" else app_dir()
    results: dict[str, Any] = {"config": pairs, "nodes": args.nodes, "cpus": os.cpu_count(), "app": args.app}
    results.update(env=env_info("cpu"), fab_bytes=fab_size(out, app))
    if args.app == "floor":  # no simulated twin: the app has no model, only Flower's costs
        floor = {"payload-bytes": 0, "client-seconds": 0.0, **parse_overrides(args.pairs)}
        payload = int(floor["payload-bytes"])
        run_config = to_flwr_run_config(
            {
                "num-rounds": args.rounds,
                "min-nodes": args.nodes,
                "payload-bytes": payload,
                "client-seconds": float(floor["client-seconds"]),
            }
        )
        dep = run_deployment(out, app, run_config, args.nodes, args.timeout)
        dep.update(floor_metrics(args.rounds, args.nodes, payload, dep["per_round_s"]))
        results["simulated"] = None
    else:
        results["simulated"] = run_simulation(out, pairs, args.nodes, args.timeout)
        dep = run_deployment(out, app, our_run_config(out, pairs, args.nodes), args.nodes, args.timeout)
        dep.update(metrics(out / "deployed"))
    results["deployed"] = dep
    results["overhead"] = overheads(dep, results["fab_bytes"], args.nodes)
    return results


def render(data: dict[str, Any]) -> Report:
    """One run: simulated against deployed."""
    sim, dep = data["simulated"], data["deployed"]

    def both(fmt: str, key: str, per_round: bool = False) -> list[str]:
        return [
            fmt.format(r[key] / (r["rounds"] if per_round else 1)) if r and r[key] is not None else "-"
            for r in (sim, dep)
        ]

    rows = [
        ["wall time of the run command (s)", *both("{:.1f}", "wall_total_s")],
        ["deployment start-up before it (s)", "-", f"{dep['startup_s']:.1f}"],
        ["strategy time, initial eval + all rounds (s)", *both("{:.1f}", "strategy_wall_s")],
        ["per round (strategy time / rounds, s)", *both("{:.2f}", "strategy_wall_s", per_round=True)],
        ["deployed per round, streamed lines (s)", "-", ", ".join(f"{x:.1f}" for x in dep["per_round_s"])],
        ["final accuracy", *both("{:.4f}", "final_accuracy")],
    ]
    return Report(
        "Deployed vs simulated: " + " ".join(data["config"]),
        body=[Table(["", "simulated", "deployed (TLS + auth)"], rows)],
    )


def render_compare(runs: dict[str, dict[str, Any]]) -> Report:
    """Saved runs (``bench/results/deployment_<name>.json``) side by side: framing and wire
    bytes per message, time per round, and end-to-end wire bytes."""
    rows = []
    for name, r in runs.items():
        dep, sim, over = r["deployed"], r["simulated"], r["overhead"]
        dep_round = dep["strategy_wall_s"] / dep["rounds"]
        sim_round = sim["strategy_wall_s"] / sim["rounds"] if sim else None
        acc = dep["final_accuracy"]
        rows.append([
            name,
            " ".join(r["config"]),
            f"{dep['uplink_bytes'] / dep['uplink_messages']:,.0f} / "
            f"{dep['downlink_bytes'] / dep['downlink_messages']:,.0f}",
            f"{over['protobuf_up_per_msg']:,.0f} / {over['protobuf_down_per_msg']:,.0f}",
            f"{over['wire_up_per_msg_excl_idle']:,.0f} / {over['wire_down_per_msg_excl_idle_fab']:,.0f}",
            f"{r['fab_bytes']:,}",
            f"{dep['wire_up_bytes'] + dep['wire_down_bytes']:,}",
            dep.get("relay_connections", "-"),
            f"{sim_round:.2f}" if sim_round else "-", f"{dep_round:.2f}",
            f"{dep_round / sim_round:.1f}x" if sim_round else "-", f"{acc:.4f}" if acc is not None else "-",
        ])  # fmt: skip
    headers = [
        "run", "config", "counted B per message (up / down)", "Flower framing B per message",
        "wire B per message (excl. idle, FAB)", "FAB bytes", "wire bytes, whole run", "TLS connections",
        "simulated s per round", "deployed s per round", "deployed / simulated", "deployed final acc",
    ]  # fmt: skip
    envs = [
        f"- `{name}`: {env_markdown(r['env']) if 'env' in r else 'environment not recorded'}"
        for name, r in runs.items()
    ]
    return Report(
        "Deployed E-3SFC, FedAvg and Flower alone: bytes per message and time per round",
        env=False,
        body=[
            "Each row is one `bench/deployment_bench.py` run (its JSON: "
            "`bench/results/deployment_<row>.json`, with the machine's load when it ran): 3 "
            "SuperNodes with TLS and node authentication on 127.0.0.1, dialling the SuperLink through "
            "a byte-counting relay, and the same config simulated. 'counted' is what our outputs "
            "counted per message when the row ran (uplink / downlink; rows measured before commit "
            "4b81295, `before-*` and `after-*`, count payload bytes only, later rows the whole "
            "encoded message, its own fields included); 'Flower framing' is Flower's own per-run "
            "accounting minus the counted bytes, per message; 'wire' is the relay's count minus the "
            "counted bytes, idle polling and the FAB downloads, per message; 'TLS connections': how "
            "many TCP (and so TLS) connections the SuperNodes opened through the relay during the run "
            "(Flower's HTTP client and server, httpx and uvicorn, close one that sat idle for 5 s, so a "
            "ClientApp that works longer than that costs its node a fresh TLS handshake). Seconds per "
            "round are the "
            "strategy's wall time over its rounds. `floor-*` rows deploy `bench/floor-app` instead "
            "(`--app floor`: each round one message of `payload-bytes` random bytes to every node "
            "and one back, no model, no torch, nothing simulated): what a deployed round costs in "
            "Flower itself on this machine.",
            "\n".join(envs),
            Table(headers, rows),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.compare:
        names = args.compare.split(",")
        runs = {n: json.loads((RESULTS / f"deployment_{n}.json").read_text()) for n in names}
        path = RESULTS / "deployment_compare.md"
        path.write_text(render_compare(runs).markdown("deployment_bench.py", {"argv": argv}))
        print(path.read_text())
        return 0
    data = {**measure(args), "argv": argv}
    save_json(args.out.resolve() / "results.json", data)
    if args.save:
        save_json(RESULTS / f"deployment_{args.save}.json", data)
    print(render(data).console())
    sim, dep = data["simulated"], data["deployed"]
    return 0 if (sim is None or sim["rc"] == 0) and dep["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
