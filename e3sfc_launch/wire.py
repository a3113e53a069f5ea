"""Byte counts of a deployed run on three levels, and the relay that measures the last.

1. counted bytes: ``len()`` of every message we encode, what the experiment counts
   (``summary.json``: ``total_uplink_bytes`` / ``total_downlink_bytes``);
2. Flower message bytes: Flower's own per-run accounting of the Fleet messages and their
   objects (``flwr ls`` -> ``network-traffic``);
3. wire bytes: everything the SuperNodes' connections carried (TLS records, HTTP,
   request signatures, polling, the app download), counted by :class:`WireCounter`, a TCP
   relay on 127.0.0.1 that the SuperNodes dial instead of the SuperLink.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

from .processes import free_port

LEVELS_KEY = "bytes_by_level"


class WireCounter:
    """TCP relay 127.0.0.1:port -> ``target`` that counts the bytes each way (loopback only)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.up = 0  # SuperNode -> SuperLink
        self.down = 0  # SuperLink -> SuperNode
        self.connections = 0
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", self.port))
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        """What the SuperNodes dial."""
        return f"127.0.0.1:{self.port}"

    def reset(self) -> tuple[int, int]:
        """Bytes up and down since the last reset (or the start), and start again."""
        with self._lock:
            counts = (self.up, self.down)
            self.up = self.down = 0
            return counts

    def close(self) -> None:
        self._stop = True
        self._srv.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    if direction == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def byte_levels(
    summary: dict[str, Any], traffic: dict[str, Any], wire: tuple[int, int] | None
) -> dict[str, dict[str, int] | None]:
    """The three levels, uplink (SuperNodes -> SuperLink) and downlink; ``None`` where
    a level was not measured."""
    flower = (int(traffic.get("inbound-bytes", 0)), int(traffic.get("outbound-bytes", 0)))
    counted = (int(summary.get("total_uplink_bytes", 0)), int(summary.get("total_downlink_bytes", 0)))
    return {
        "counted": _directions(counted),
        "flower_messages": _directions(flower) if traffic else None,
        "wire": _directions(wire) if wire is not None else None,
    }


def _directions(pair: tuple[int, int]) -> dict[str, int]:
    return {"uplink": pair[0], "downlink": pair[1]}


def record_levels(summary_path: Path, levels: dict[str, dict[str, int] | None]) -> None:
    """Add the levels to the run's ``summary.json`` (under ``bytes_by_level``)."""
    summary = json.loads(summary_path.read_text())
    summary[LEVELS_KEY] = levels
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def levels_text(levels: dict[str, dict[str, int] | None]) -> list[str]:
    """One line per level, for the launcher's output."""
    names = {"counted": "our messages", "flower_messages": "Flower messages", "wire": "wire (relay)"}
    lines = []
    for key, name in names.items():
        level = levels.get(key)
        if level is None:
            lines.append(f"{name:>18}: not measured")
        else:
            lines.append(f"{name:>18}: {level['uplink']:>12,} B up {level['downlink']:>12,} B down")
    return lines
