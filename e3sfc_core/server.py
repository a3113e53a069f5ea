"""Server side of a round: sampling, downlink catch-up, budget, validation, aggregation.

:class:`FederatedServer` is the whole server algorithm with no framework in it. The Flower
strategy and the plain-Python loop (:mod:`e3sfc_core.simulate`) both drive it through
``plan_round`` and ``aggregate_round``, so they run the same algorithm.

Versions: the global weights get a new version each time they change (a skipped round
keeps the version). ``history[v]`` is the downlink payload that turns version ``v - 1``
into ``v``; a client holding version ``s`` catches up by replaying ``s+1..current``, or
gets the full weights when that is fewer bytes or its version is unknown.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .budget import BudgetScheduler, Demand, Feedback
from .compressor import Budget, PayloadMeta, build_compressor
from .config import ExperimentConfig
from .datasets import DatasetSpec
from .errors import BudgetExhausted, PayloadError
from .models import build_model
from .payload import (
    BundleBody,
    Codec,
    DenseBody,
    Direction,
    Payload,
    bundle_size,
    carries_batch,
    dense_size,
    encode,
)
from .protocol import STATUS_DESYNC, STATUS_OK, Instruction, Reply, instruction_size, reply_size
from .rounds import (
    Expectation,
    aggregation_multipliers,
    bounded_residual,
    bundle_update,
    check_payload,
    compress_update,
    exact_decompress,
    weighted_sum,
)
from .seeds import SAMPLE, derive_seed
from .synthetic_gradient import parameter_sizes
from .tensors import add_flat_, digest_flat, get_flat, num_params, set_flat

logger = logging.getLogger(__name__)
INSTRUCTION_FIELDS = instruction_size([])  # an instruction without payloads
REPLY_FIELDS = reply_size(0)  # a reply without its payload
LENGTH_FIELD = instruction_size([0]) - INSTRUCTION_FIELDS  # per payload in an instruction


@dataclass
class RoundRecord:
    """One row of ``metrics.csv``."""

    round: int
    accuracy: float = float("nan")
    loss: float = float("nan")
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    cum_uplink_bytes: int = 0
    cum_downlink_bytes: int = 0
    mean_cosine: float = float("nan")
    downlink_cosine: float = float("nan")
    compress_seconds: float = 0.0
    train_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    n_uplink: int = 0
    n_downlink: int = 0
    sampled: int = 0
    accepted: int = 0
    dropped: int = 0
    desynced: int = 0
    full_syncs: int = 0
    clipped: int = 0
    skipped: bool = False
    # payloads that carried a synthetic batch (the corrected 3SFC sends its Top-k alone
    # when that leaves less behind): accepted uplinks, and the compressed downlink (0/1)
    uplink_batches: int = 0
    downlink_batch: int = 0


class FederatedServer:
    """Global model, server residual, budget and per-node bookkeeping of one run."""

    def __init__(self, cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device) -> None:
        self.cfg, self.spec, self.device = cfg, spec, device
        self.model = build_model(cfg.model, tuple(spec.input_shape), spec.n_classes, cfg.seed).to(device)
        self.model.eval()
        self.compressor = build_compressor(
            cfg.compressor_name, cfg.compressor_settings(len(parameter_sizes(self.model))), spec
        )
        self.numel = num_params(self.model)
        self.residual = torch.zeros(self.numel, device=device)
        self.scheduler = BudgetScheduler(cfg.budget_params())
        self.version = 0
        self.digest = digest_flat(get_flat(self.model))
        self.history: dict[int, bytes] = {}  # version -> payload producing it
        self.synced: dict[int, int | None] = {}  # node -> version it holds (None: unknown)
        self._restarted = False  # after a resume, unknown nodes get full weights
        self.accepted: dict[int, int] = {}  # node -> last round its uplink was applied
        self.applied_scale: dict[int, float] = {}  # node -> clip scale of that uplink (< 1 only)
        self.records: list[RoundRecord] = []
        self.n_down = cfg.synthetic_samples  # samples of the downlink payload sent next
        self._n_next = cfg.synthetic_samples  # samples for the one this round makes
        self._plan: dict[int, Instruction] = {}
        self._full: tuple[int, bytes] | None = None
        self._pending = RoundRecord(round=0)

    # ----------------------------------------------------------------------- sampling

    def sample(self, server_round: int, node_ids: Sequence[int]) -> list[int]:
        """Seeded choice of this round's clients: ``fraction-train`` of them, at least
        ``min-train-nodes`` (or all that exist).

        Clients are keyed by partition id in both runtimes (the Flower glue maps node IDs,
        random per run, to the partitions the nodes report: :mod:`e3sfc_core.roster`), so
        the same seed picks the same partitions in every run, in Flower and in-process."""
        nodes = sorted(node_ids)
        k = min(len(nodes), max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(nodes))))
        return sorted(random.Random(derive_seed(self.cfg.seed, SAMPLE, server_round)).sample(nodes, k))

    def rejoined(self, client: int) -> None:
        """Another process now serves ``client`` (a restarted SuperNode): what weights it
        holds is unknown, so it gets the full weights next time. ``accepted`` is kept: a
        client that restored its state from ``state-dir`` still needs it."""
        self.synced[client] = None

    # ----------------------------------------------------------------------- downlink

    def full_weights(self) -> bytes:
        """The current global weights as one ``WEIGHTS`` payload (cached per version)."""
        if self._full is None or self._full[0] != self.version:
            payload = Payload(
                codec=Codec.WEIGHTS,
                direction=Direction.DOWNLINK,
                server_round=len(self.records),
                base_digest=self.digest,
                numel=self.numel,
                body=DenseBody(get_flat(self.model).cpu()),
            )
            self._full = (self.version, encode(payload))
        return self._full[1]

    @property
    def full_size(self) -> int:
        """Bytes of a full-weights re-sync, from the size function: sizing a sync never
        encodes the weights (only sending one does)."""
        return dense_size(self.numel)

    def downlink_for(self, node_id: int) -> tuple[tuple[bytes, ...], bool]:
        """Payloads that bring ``node_id`` to the current version, and whether they are a
        full-weights re-sync.

        A node we have not heard from is assumed to hold version 0: every client builds
        the initial model from the shared seed, as the server did, so nothing needs to be
        sent. If that assumption is wrong the client cannot match a base digest, answers
        ``desync``, and gets the full weights in its next round.
        """
        have = self.synced.get(node_id, 0 if not self._restarted else None)
        if have == self.version:
            return (), False
        if have is not None:
            replay = [self.history.get(v) for v in range(have + 1, self.version + 1)]
            if all(p is not None for p in replay) and sum(len(p) for p in replay if p) < self.full_size:
                return tuple(p for p in replay if p is not None), False
        return (self.full_weights(),), True

    def _prune_history(self) -> None:
        """Forget payloads that no replay would use (replaying them costs more than a
        full re-sync)."""
        limit, total = self.full_size, 0
        for v in sorted(self.history, reverse=True):
            total += len(self.history[v])
            if total >= limit:
                for old in [u for u in self.history if u <= v]:
                    del self.history[old]
                break

    # -------------------------------------------------------------------------- round

    def payload_size(self, n_samples: int) -> int:
        """Exact bytes of one payload (uplink or compressed downlink) with ``n_samples``."""
        return self.compressor.encoded_size(self.numel, Budget(n_samples))

    def plan_round(self, server_round: int, node_ids: Sequence[int]) -> dict[int, Instruction]:
        """Instructions for this round's sampled clients; spends their downlink bytes.

        Raises
        ------
        BudgetExhausted
            When even the smallest round no longer fits in the byte budget.
        """
        chosen = self.sample(server_round, node_ids)
        downs = {n: self.downlink_for(n) for n in chosen}
        down_bytes = sum(instruction_size([len(p) for p in d]) for d, _ in downs.values())
        demands = [] if self.scheduler.unlimited else self.forecast(server_round, downs)
        plan = self.scheduler.plan_round(server_round, demands, self.payload_size)
        n_up, self._n_next = plan.n_uplink, plan.n_downlink
        up_size = self.payload_size(n_up)
        needed = down_bytes + len(chosen) * reply_size(up_size)
        if not self.scheduler.can_afford(needed):
            raise BudgetExhausted(
                f"round {server_round} needs {needed} bytes, {self.scheduler.remaining()} left"
            )
        self.scheduler.spend(Direction.DOWNLINK, down_bytes)
        record = RoundRecord(
            round=server_round, downlink_bytes=down_bytes, n_uplink=n_up, sampled=len(chosen)
        )
        record.n_downlink = self.n_down if self.cfg.compress_downlink else 0
        record.full_syncs = sum(1 for _, full in downs.values() if full)
        self._pending = record
        self._plan = {
            n: Instruction(
                server_round=server_round,
                n_samples=n_up,
                target_digest=self.digest,
                max_uplink_bytes=up_size,
                accepted_round=self.accepted.get(n, -1),
                applied_scale=self.applied_scale.get(n, 1.0),
                downlink=d,
            )
            for n, (d, _) in downs.items()
        }
        return dict(self._plan)

    def forecast(self, server_round: int, now: Mapping[int, tuple[tuple[bytes, ...], bool]]) -> list[Demand]:
        """What this round (its clients and their catch-up: ``now``) and every later one
        will send, for the budget scheduler.

        Sampling is seeded, so the clients of every coming round are known: drawn from
        every partition, which the run expects to be served (a Flower run may start
        before every node has connected; this keeps its plans equal to the in-process
        loop's). A client sampled in round ``j`` receives the payloads made since it was
        last sampled: those already made cost their exact bytes, each one a coming round
        makes counts as a delivery of that round's payload; with a dense downlink every
        client behind gets the full weights. Skipped rounds and replays longer than a
        full re-sync are not foreseen, which makes the forecast an upper bound; a desync
        cannot be foreseen, but its re-sync is in every forecast after it. Every message
        also costs its own fields (``protocol``): one instruction and one reply per client,
        and a length field per payload an instruction carries."""
        last = max(self.cfg.num_rounds, server_round)
        seen: dict[int, int] = {}  # client -> latest coming round it is sampled in
        deliveries = dict.fromkeys(range(server_round, last + 1), 0)
        rows: list[tuple[int, int]] = []
        everyone = range(self.cfg.num_partitions)
        for j in range(server_round, last + 1):
            chosen = list(now) if j == server_round else self.sample(j, everyone)
            fixed = len(chosen) * INSTRUCTION_FIELDS
            for client in chosen:
                existing = 0
                if client not in seen:  # its catch-up of payloads already made
                    down = now.get(client) or self.downlink_for(client)
                    existing = instruction_size([len(p) for p in down[0]]) - INSTRUCTION_FIELDS
                since = seen.get(client, server_round)
                if self.cfg.compress_downlink:
                    fixed += existing
                    for k in range(since, j):
                        deliveries[k] += 1
                else:
                    fixed += self.full_size + LENGTH_FIELD if j > since else existing
                seen[client] = j
            rows.append((len(chosen), fixed))
        return [
            Demand(u, deliveries[j], f, uplink_fixed=u * REPLY_FIELDS, per_delivery=LENGTH_FIELD)
            for j, (u, f) in enumerate(rows, start=server_round)
        ]

    def aggregate_round(self, server_round: int, replies: Sequence[Reply]) -> RoundRecord:
        """Validate and aggregate the replies, update the global model (and compress the
        downlink for the next round). Bad replies are dropped with a logged reason."""
        start = time.perf_counter()
        rec = self._pending
        expect = Expectation(
            direction=Direction.UPLINK,
            server_round=server_round,
            base_digest=self.digest,
            codec=self.compressor.codec,
            numel=self.numel,
            max_bytes=self.payload_size(rec.n_uplink),
            max_samples=rec.n_uplink,
        )
        updates, weights, cosines, comp, train, accepted, nodes = [], [], [], [], [], [], []
        ratios = []
        # decompress as the clients did (CPU, one thread): see rounds.exact_decompress
        cpu_model = self.model if self.device.type == "cpu" else copy.deepcopy(self.model).cpu()
        # Arrival order and deployed node IDs are arbitrary; a fixed order (by the
        # partition each client reports) keeps float sums, and so runs, reproducible.
        for reply in sorted(replies, key=lambda r: (r.partition_id, r.node_id)):
            rec.uplink_bytes += reply.size
            if reply.node_id not in self._plan:
                logger.warning(
                    "round %d: reply from node %s that was not sampled", server_round, reply.node_id
                )
                rec.dropped += 1
                continue
            if reply.status == STATUS_DESYNC:
                logger.warning(
                    "round %d: node %s is out of sync; full weights next time", server_round, reply.node_id
                )
                self.synced[reply.node_id] = None
                rec.desynced += 1
                continue
            if reply.status != STATUS_OK:
                logger.warning("round %d: node %s failed: %s", server_round, reply.node_id, reply.error)
                rec.dropped += 1
                continue
            try:
                if reply.num_examples < 1:
                    raise PayloadError("reply reports no training examples")
                payload = check_payload(reply.payload, expect)
                update = exact_decompress(self.compressor, payload, cpu_model).to(self.device)
            except PayloadError as exc:
                logger.warning("round %d: dropped reply of node %s: %s", server_round, reply.node_id, exc)
                rec.dropped += 1
                continue
            self.synced[reply.node_id] = self.version  # it trained from the current weights
            rec.uplink_batches += carries_batch(payload)
            updates.append(update)
            accepted.append(reply.payload)
            weights.append(float(reply.num_examples))
            cosines.append(reply.metrics.get("cosine", float("nan")))
            ratios.append(reply.metrics.get("update-residual-ratio", float("nan")))
            comp.append(reply.metrics.get("compress-seconds", 0.0))
            train.append(reply.metrics.get("train-seconds", 0.0))
            nodes.append(reply.node_id)
            self.accepted[reply.node_id] = server_round
        missing = set(self._plan) - {r.node_id for r in replies}
        if missing:
            logger.warning(
                "round %d: no reply from %d node(s): %s", server_round, len(missing), sorted(missing)
            )
            rec.dropped += len(missing)
        self.scheduler.spend(Direction.UPLINK, rec.uplink_bytes, force=True)
        rec.accepted = len(updates)
        if cosines:
            rec.mean_cosine = float(sum(cosines) / len(cosines))
            rec.compress_seconds = float(sum(comp) / len(comp))
            rec.train_seconds = float(sum(train) / len(train))
            self.scheduler.observe(Direction.UPLINK, Feedback(rec.mean_cosine, sum(ratios) / len(ratios)))
        if len(updates) < min(self.cfg.min_train_nodes, len(self._plan)) or not updates:
            logger.warning(
                "round %d skipped: %d valid replies, need %d",
                server_round,
                len(updates),
                self.cfg.min_train_nodes,
            )
            for node in self._plan:
                if self.accepted.get(node) == server_round:
                    del self.accepted[node]
            rec.skipped = True
        else:
            factors, scales = aggregation_multipliers(updates, weights, self.cfg.clip_norm_factor)
            rec.clipped = self._note_clipping(nodes, scales)
            bundle_bytes = bundle_size([len(p) for p in accepted])
            if self.cfg.relays(bundle_bytes, dense_size(self.numel)):
                self._relay(server_round, BundleBody(tuple(factors), tuple(accepted)), rec)
            else:
                self._apply(server_round, weighted_sum(updates, factors), rec)
        rec.aggregate_seconds = time.perf_counter() - start
        self._plan = {}
        return rec

    def _note_clipping(self, nodes: Sequence[int], scales: Sequence[float]) -> int:
        """Remember each node's clip scale, sent with its next instruction (its error
        feedback then keeps what clipping held back); returns how many were clipped."""
        for node, scale in zip(nodes, scales, strict=True):
            if scale < 1.0:
                self.applied_scale[node] = scale
            else:
                self.applied_scale.pop(node, None)
        return sum(1 for scale in scales if scale < 1.0)

    def _apply(self, server_round: int, mean: torch.Tensor, rec: RoundRecord) -> None:
        """Move the global model by the aggregate (or by its compressed downlink)."""
        if self.cfg.compress_downlink:
            self.n_down = self._n_next
            if self.cfg.downlink_samples and not self.cfg.budget_total_bytes:
                self.n_down = self.cfg.downlink_samples
            meta = PayloadMeta(Direction.DOWNLINK, server_round, self.digest)
            residual = bounded_residual(self.residual, mean, self.cfg.residual_cap)
            enc = compress_update(self.compressor, mean + residual, self.model, meta, Budget(self.n_down))
            self.residual = enc.residual
            rec.downlink_cosine = enc.cosine
            rec.downlink_batch = int(carries_batch(enc.decoded))
            rec.compress_seconds += enc.stats.seconds
            fresh = float(mean.norm())  # the residual relative to the fresh aggregate
            ratio = float(enc.residual.norm()) / fresh if fresh > 0 else 0.0
            self.scheduler.observe(Direction.DOWNLINK, Feedback(enc.cosine, ratio))
            add_flat_(self.model, enc.transmitted)
            self._advance(enc.data)
        else:
            add_flat_(self.model, mean)
            self._advance(None)

    def _relay(self, server_round: int, body: BundleBody, rec: RoundRecord) -> None:
        """Relayed downlink: the round's accepted uplink payloads and their aggregation
        weights go to the clients as one bundle, and the global model moves by exactly
        what they will reconstruct from it (no second compression, no server residual).
        ``body`` is what the clients decode: the payload bytes travel as they are and the
        weights round-trip exactly through their float64 field."""
        payload = Payload(Codec.BUNDLE, Direction.DOWNLINK, server_round, self.digest, self.numel, body)
        data = encode(payload)
        add_flat_(self.model, bundle_update(self.compressor, body, self.model).to(self.device))
        rec.downlink_cosine = 1.0
        self.n_down = 0  # nothing synthesised on the server for the next round's downlink
        self._advance(data)

    def _advance(self, downlink: bytes | None) -> None:
        """The global weights changed: a new version, reached from the previous one by the
        ``downlink`` payload (None: a dense downlink, never replayed from history)."""
        if downlink is not None:
            self.history[self.version + 1] = downlink
        self.version += 1
        self.digest = digest_flat(get_flat(self.model))
        if downlink is not None:
            self._prune_history()

    def finish_round(self, rec: RoundRecord, loss: float, accuracy: float) -> RoundRecord:
        """Attach the evaluation and cumulative byte counts, and keep the record."""
        rec.loss, rec.accuracy = loss, accuracy
        self.scheduler.observe_accuracy(accuracy)
        prev = self.records[-1] if self.records else None
        rec.cum_uplink_bytes = (prev.cum_uplink_bytes if prev else 0) + rec.uplink_bytes
        rec.cum_downlink_bytes = (prev.cum_downlink_bytes if prev else 0) + rec.downlink_bytes
        self.records.append(rec)
        return rec

    # -------------------------------------------------------------------- checkpoints

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able metadata that restore this server exactly."""
        tensors = {"weights": get_flat(self.model).cpu(), "residual": self.residual.cpu()}
        for v, data in self.history.items():
            tensors[f"history.{v}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        meta = {
            "version": self.version,
            "n_down": self.n_down,
            "scheduler": self.scheduler.state_dict(),
            "synced": [[node, v] for node, v in self.synced.items()],
            "accepted": [[node, r] for node, r in self.accepted.items()],
            "applied_scale": [[node, s] for node, s in self.applied_scale.items()],
            "records": [asdict(r) for r in self.records],
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Known nodes keep their bookkeeping (a client
        that kept its state resumes exactly); nodes we have no record of get full weights."""
        set_flat(self.model, tensors["weights"].to(self.device))
        self.residual = tensors["residual"].to(self.device)
        self.history = {
            int(k.split(".", 1)[1]): bytes(t.numpy().tobytes())
            for k, t in tensors.items()
            if k.startswith("history.")
        }
        self.version = int(meta["version"])
        self.n_down = int(meta["n_down"])
        self.scheduler = BudgetScheduler.from_state_dict(self.cfg.budget_params(), meta["scheduler"])
        self.records = [RoundRecord(**r) for r in meta["records"]]
        self.digest = digest_flat(get_flat(self.model))
        self.synced = {int(n): (None if v is None else int(v)) for n, v in meta.get("synced", [])}
        self.accepted = {int(n): int(r) for n, r in meta.get("accepted", [])}
        self.applied_scale = {int(n): float(s) for n, s in meta.get("applied_scale", [])}
        self._full = None
        self._restarted = True
