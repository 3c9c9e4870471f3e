"""A Message-API Flower Strategy that runs any fl-clip21 algorithm.

The strategy holds the model x and the algorithm's server state (Clip21's
aggregate g). Each round it samples clients, sends x, checks every reply
before using it, and applies the algorithm's server update to the accepted
replies. A reply that fails a check is not applied: it is counted in the
round's metrics (``rejected``), logged with its node id, and the round goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fl_clip21 import core
from fl_clip21.algorithms import Algorithm, model_size
from fl_clip21.engine import round_epsilon, sample_clients
from fl_clip21.flower import records as R
from fl_clip21.flower.client import NUM_PARTITIONS, PARTITION_ID

NORM_SLACK = 1e-6  # a message may exceed the bound by this relative amount (float rounding)


class ClientSetupError(RuntimeError):
    """The nodes that registered do not form the expected set of clients."""


def check_message(
    message: ArrayRecord | None, reference: dict[str, np.ndarray], bound: float | None, sparse: bool = False
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Validate one client message against the model's layout.

    Returns ``(arrays, None)`` when the message may be applied, else
    ``(None, reason)``: keys, shapes and dtypes must match the model (a sparse
    message must decode to it), every value must be finite, and the global norm
    must be <= ``bound * (1 + 1e-6)``.
    """
    if message is None:
        return None, f"no {R.ARRAYS!r} ArrayRecord in the reply"
    if sparse:
        dense, reason = R.decode_sparse(message, reference)
        if dense is None:
            return None, reason
        message = R.to_record(dense)
    if set(message.keys()) != set(reference):
        return None, f"array keys {sorted(message.keys())} differ from the model's {sorted(reference)}"
    arrays = {}
    for k, ref in reference.items():
        arr = message[k]
        if tuple(arr.shape) != ref.shape or np.dtype(arr.dtype) != ref.dtype:
            return None, f"array {k!r} has shape {tuple(arr.shape)} {arr.dtype}, expected {ref.shape} {ref.dtype}"
        a = arr.numpy()
        if not np.all(np.isfinite(a)):
            return None, f"array {k!r} has non-finite values"
        arrays[k] = a
    if bound is not None:
        norm = core.global_norm(arrays)
        if norm > bound * (1 + NORM_SLACK):
            return None, f"norm {norm:.6g} exceeds tau={bound:.6g}"
    return arrays, None


class Clip21Strategy(Strategy):
    """Run ``algorithm`` over ``num_clients`` Flower nodes.

    Parameters
    ----------
    algorithm:
        Any :class:`~fl_clip21.algorithms.Algorithm` (``clip21-gd``, ``gd``...).
    scenario:
        The resolved scenario; clients build their problem and hyper-parameters
        from it, so it travels with every train message.
    num_clients:
        n, the number of clients; g divides by n whatever the participation.
    fraction:
        Share of clients sampled per round (seeded by ``seed`` and the round).
    audit:
        Clients also return v_i; each round reports ``invariant_gap`` =
        max |g - mean_i v_i| over every client.
    node_wait_timeout:
        Seconds to wait for all ``num_clients`` nodes to register.
    delta:
        delta at which ``epsilon`` is reported (algorithms with DP noise).
    client_of_node:
        Node id -> client index, when the caller already knows it (from an
        earlier strategy's :attr:`client_of_node`); otherwise the first round
        starts with a handshake that asks every node for its partition-id.
    """

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        scenario: dict[str, Any],
        num_clients: int,
        fraction: float = 1.0,
        seed: int = 0,
        audit: bool = False,
        node_wait_timeout: float = 600.0,
        client_of_node: dict[int, int] | None = None,
        delta: float = 1e-5,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
        self.algorithm = algorithm
        self.num_clients = num_clients
        self.fraction = fraction
        self.seed = seed
        self.audit = audit and algorithm.memory is not None
        self.delta = delta
        self.node_wait_timeout = node_wait_timeout
        self._scenario_json = json.dumps(scenario, sort_keys=True)
        self.params: dict[str, np.ndarray] | None = None
        self.server_state: dict | None = None
        self.client_of_node: dict[int, int] = dict(client_of_node or {})
        self._asked: dict[int, int] = {}
        self._audit_v: dict[int, dict[str, np.ndarray]] = {}
        self.times_asked = np.zeros(num_clients, dtype=np.int64)  # rounds each client was asked
        self.history: list[dict[str, float]] = []

    # --- set-up -------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.node_wait_timeout
        while len(nodes := list(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise ClientSetupError(
                    f"only {len(nodes)} of num-clients={self.num_clients} nodes registered "
                    f"within {self.node_wait_timeout:.0f} s"
                )
            time.sleep(0.2)
        return nodes

    def handshake(self, grid: Grid) -> None:
        """Learn which client index (partition-id) every node holds."""
        nodes = self._wait_for_nodes(grid)
        msgs = [
            Message(RecordDict({R.CONFIG: ConfigRecord({})}), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in nodes
        ]
        mapping: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=self.node_wait_timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                raise ClientSetupError(f"node {nid} failed the handshake: {reply.error.reason}")
            cfg = reply.content[R.CONFIG]
            mapping[nid] = int(cfg[PARTITION_ID])
            if int(cfg.get(NUM_PARTITIONS, self.num_clients)) not in (-1, self.num_clients):
                raise ClientSetupError(
                    f"node {nid} says num-partitions={cfg[NUM_PARTITIONS]}, but num-clients={self.num_clients}"
                )
        ids = sorted(mapping.values())
        if ids != list(range(self.num_clients)):
            raise ClientSetupError(
                f"nodes must hold partition-id 0..{self.num_clients - 1} once each, got {ids}"
            )
        self.client_of_node = mapping
        log(INFO, "fl-clip21: %d nodes hold clients 0..%d", len(mapping), self.num_clients - 1)

    def sample_clients(self, server_round: int) -> list[int]:
        """The client indices that take part in ``server_round`` (seeded)."""
        return sample_clients(self.seed, server_round, self.num_clients, self.fraction)

    # --- Strategy interface ---------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.params is None:
            self.params = R.from_record(arrays)
            self.server_state = self.algorithm.server_init(self.params)
            self._audit_v = {i: core.zeros_like(self.params) for i in range(self.num_clients)}
            bound = self.algorithm.message_bound
            self._bound = bound(model_size(self.params)) if bound is not None else None
        if not self.client_of_node:
            self.handshake(grid)
        node_of_client = {c: nid for nid, c in self.client_of_node.items()}
        clients = self.sample_clients(server_round)
        self._asked = {node_of_client[c]: c for c in clients}
        self.times_asked[clients] += 1
        self._round_start = time.perf_counter()
        cfg = ConfigRecord(dict(config))
        cfg[R.ROUND] = server_round
        cfg[R.ALGORITHM] = self.algorithm.name
        cfg[R.SCENARIO] = self._scenario_json
        cfg[R.DO_AUDIT] = self.audit
        model = R.to_record(self.params)
        return [
            Message(
                RecordDict({R.ARRAYS: model, R.CONFIG: cfg}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
            )
            for nid in self._asked
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.params is not None and self.server_state is not None
        accepted: list[dict[str, np.ndarray]] = []
        rejected = failed = clipped = bytes_up = 0
        seen: set[int] = set()  # nodes whose message was accepted
        responded: set[int] = set()
        for reply in replies:
            nid = reply.metadata.src_node_id
            responded.add(nid)
            if reply.has_error():
                failed += 1
                log(WARNING, "round %d: node %d replied with an error: %s", server_round, nid, reply.error.reason)
                continue
            record = reply.content.array_records.get(R.ARRAYS)
            if record is not None:
                bytes_up += R.payload_bytes(record)
            if nid not in self._asked or nid in seen:
                reason = "node was not asked this round" if nid not in self._asked else "duplicate reply"
                arrays = None
            else:
                arrays, reason = check_message(record, self.params, self._bound, self.algorithm.sparse)
            if arrays is None:
                rejected += 1
                log(WARNING, "round %d: rejected the message of node %d: %s", server_round, nid, reason)
                continue
            seen.add(nid)
            accepted.append(arrays)
            metrics = reply.content.metric_records.get(R.METRICS)
            clipped += int(metrics["clipped"]) if metrics is not None and "clipped" in metrics else 0
            if self.audit and R.AUDIT in reply.content.array_records:
                self._audit_v[self._asked[nid]] = R.from_record(reply.content[R.AUDIT])
        failed += len(set(self._asked) - responded)  # replies that never came
        self.params, self.server_state = self.algorithm.server_update(
            self.params, self.server_state, accepted, self.num_clients
        )
        record = {
            "round": server_round,
            "participants": len(self._asked),
            "accepted": len(accepted),
            "clip_fraction": clipped / len(accepted) if accepted else 0.0,
            "rejected": rejected,
            "failed": failed,
            "bytes_up": bytes_up,
            "seconds": time.perf_counter() - self._round_start,
        }
        if self.audit:
            record["invariant_gap"] = self.invariant_gap()
        record.update(round_epsilon(self.algorithm, self.times_asked, self.delta))
        self.history.append(record)
        return R.to_record(self.params), MetricRecord({k: v for k, v in record.items() if k != "round"})

    def invariant_gap(self) -> float:
        """max |g - (1/n) sum_i v_i| over the v_i the clients last reported."""
        assert self.server_state is not None
        mean_v = core.mean(list(self._audit_v.values()))
        g = self.server_state["g"]
        return max(float(np.max(np.abs(g[k] - mean_v[k]))) if g[k].size else 0.0 for k in g)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(
            INFO,
            "\t%s on %d clients, fraction %.3g, hyper-parameters %s",
            self.algorithm.name, self.num_clients, self.fraction, dict(self.algorithm.hyper),
        )
