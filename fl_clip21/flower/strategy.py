"""A Message-API Flower Strategy that runs any fl-clip21 algorithm.

The strategy holds the model x and the algorithm's server state (Clip21's
aggregate g). Each round it samples clients, sends x, checks every reply
before using it, and applies the algorithm's server update to the accepted
replies. A reply that fails a check is not applied: it is counted in the
round's metrics (``rejected``), logged with its node id, and the round goes on.

For error-feedback algorithms it also runs the server side of the consistency
protocol (see :mod:`fl_clip21.flower.client`): it keeps, per client, the sum
of the increments it applied (its copy of v_i) and the last round it applied
one; it tells each client that round (``ack``) and sends its copy back to a
client whose increment it did not apply or that lost its state (``resync``).
The copies live in a file (:class:`~fl_clip21.copies.MemoryCopies`), not in
RAM: they are read only to repair a fault. With ``checkpoint`` it saves its
state after every round, atomically, and :meth:`resume` continues from it.

A reply later than the round's timeout is dropped like a lost one. The node
may still be working on it, and Flower's simulation engine would then run the
node's next message at the same time, from the same ``context.state``, and
keep whichever state is written back last (``vce_api.worker``: no per-node
lock). So the strategy sends a node its next message only once the late reply
has come in (or ``late_reply_wait`` seconds have passed), and throws it away.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from fl_clip21 import checkpoint as ckpt
from fl_clip21 import core
from fl_clip21.algorithms import Algorithm, model_size
from fl_clip21.copies import MemoryCopies
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
        arrays, reason = R.decode_sparse(message, reference)  # decodes to the model's layout
        if arrays is None:
            return None, reason
    else:
        if set(message.keys()) != set(reference):
            return None, f"array keys {sorted(message.keys())} differ from the model's {sorted(reference)}"
        arrays = {}
        for k, ref in reference.items():
            arr = message[k]
            if tuple(arr.shape) != ref.shape or np.dtype(arr.dtype) != ref.dtype:
                return None, f"array {k!r} has shape {tuple(arr.shape)} {arr.dtype}, expected {ref.shape} {ref.dtype}"
            arrays[k] = arr.numpy()
    for k, a in arrays.items():
        if not np.all(np.isfinite(a)):
            return None, f"array {k!r} has non-finite values"
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
        The resolved scenario; fl-clip21's clients build their problem and
        hyper-parameters from it, so it travels with every train message.
        ``None`` for any other ClientApp wrapped in
        :func:`~fl_clip21.flower.mod.clip21_mod`: messages then carry ``tau``
        and the train config given to :meth:`start`, and nodes are numbered in
        the order of their ids instead of by a partition-id handshake.
    num_clients:
        n, the number of clients; g divides by n whatever the participation.
    fraction:
        Share of clients sampled per round (seeded by ``seed`` and the round).
    audit:
        Clients also return their memory; each round reports ``invariant_gap`` =
        max |g - mean_i v_i| over the memories the clients last reported.
    node_wait_timeout:
        Seconds to wait for all ``num_clients`` nodes to register at the start.
    delta:
        delta at which ``epsilon`` is reported (algorithms with DP noise).
    client_of_node:
        Node id -> client index, when the caller already knows it (from an
        earlier strategy's :attr:`client_of_node`); otherwise the first round
        starts with a handshake that asks every node for its partition-id.
    checkpoint:
        File to save the server's state to after every round. The copies of
        the clients' memories go next to it (same name, ``.copies``);
        without a checkpoint, to a temporary folder (``copies_dir``).
    evaluate:
        ``params -> metrics``, merged into each round's record (before the
        checkpoint is written, so a resumed run has every round's metrics).
    on_round:
        Called with each round's record, e.g. for a progress display.
    fraction_evaluate:
        Share of nodes sent Flower evaluate messages after each round (their
        ``MetricRecord`` replies are averaged, weighted by ``num-examples``);
        0 skips client-side evaluation (``evaluate_fn`` of :meth:`start` still runs).
    availability:
        Probability that a client is online in a round; each round samples
        among the online clients (:func:`~fl_clip21.engine.sample_clients`).
    late_reply_wait:
        Longest wait, in seconds, for the late reply of a node before sending
        that node another message (see above).
    copies_dir:
        Folder for the copies file of a run without ``checkpoint`` (default:
        a new temporary folder, removed with the strategy).
    """

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        scenario: dict[str, Any] | None,
        num_clients: int,
        fraction: float = 1.0,
        seed: int = 0,
        audit: bool = False,
        node_wait_timeout: float = 600.0,
        client_of_node: dict[int, int] | None = None,
        delta: float = 1e-5,
        checkpoint: str | Path | None = None,
        evaluate: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        fraction_evaluate: float = 0.0,
        availability: float = 1.0,
        late_reply_wait: float = 600.0,
        copies_dir: str | Path | None = None,
    ) -> None:
        if not 0 <= fraction_evaluate <= 1:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if not 0 < availability <= 1:
            raise ValueError(f"availability must be in (0, 1], got {availability!r}")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
        self.algorithm = algorithm
        self.num_clients = num_clients
        self.fraction = fraction
        self.availability = availability
        self.late_reply_wait = late_reply_wait
        self.seed = seed
        self.audit = audit and algorithm.memory is not None
        self.delta = delta
        self.node_wait_timeout = node_wait_timeout
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.copies_dir = Path(copies_dir) if copies_dir is not None else None
        self.evaluate = evaluate
        self.fraction_evaluate = fraction_evaluate
        self.on_round = on_round
        self._scenario_json = json.dumps(scenario, sort_keys=True) if scenario is not None else None
        self.params: dict[str, np.ndarray] | None = None
        self.server_state: dict | None = None
        self.client_of_node: dict[int, int] = dict(client_of_node or {})
        self.session = uuid.uuid4().hex[:16]  # scopes the clients' state to this run of this algorithm
        self.round = 0  # the last round completed
        self.times_asked = np.zeros(num_clients, dtype=np.int64)  # rounds each client was asked
        self.last_applied = np.zeros(num_clients, dtype=np.int64)  # round of the last increment applied
        self.copies: MemoryCopies | None = None  # per client: the sum of its increments applied
        self.needs_resync: set[int] = set()
        self.history: list[dict[str, Any]] = []
        self._asked: dict[int, int] = {}
        self._sent: list[Message] = []  # this round's messages (their ids are set when pushed)
        self._late: dict[int, str] = {}  # node -> id of a message whose reply missed its round
        self._audit_v: dict[int, dict[str, np.ndarray]] = {}
        self._bound: float | None = None

    # --- state ----------------------------------------------------------------

    def _copies_path(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint.with_name(self.checkpoint.name + ".copies")
        folder = self.copies_dir
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="fl-clip21-copies-"))
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        return folder / f"{self.algorithm.name}.{self.session}.copies"

    def _open_copies(self, params: dict[str, np.ndarray], create: bool) -> MemoryCopies:
        return MemoryCopies(
            self._copies_path(), params, self.num_clients, slots=2 if self.checkpoint is not None else 1,
            create=create,
        )

    def _init_state(self, params: dict[str, np.ndarray], new_copies: bool = True) -> None:
        self.params = params
        self.server_state = self.algorithm.server_init(params)
        if self.algorithm.memory is not None and new_copies:
            self.copies = self._open_copies(params, create=True)
        if self.audit:  # the memories the clients reported (only when auditing: n more copies)
            self._audit_v = {i: core.zeros_like(params) for i in range(self.num_clients)}
        bound = self.algorithm.message_bound
        self._bound = bound(model_size(params)) if bound is not None else None

    def server_copy(self, client: int) -> dict[str, np.ndarray]:
        """The server's copy of ``client``'s memory (the sum of its increments applied)."""
        assert self.copies is not None
        return self.copies.get(client, int(self.last_applied[client]))

    def save_checkpoint(self) -> None:
        """Write the server's whole state to :attr:`checkpoint` (atomically)."""
        assert self.checkpoint is not None and self.params is not None
        arrays = {"params": self.params, **{f"server.{k}": v for k, v in self.server_state.items()}}
        if self.copies is not None:
            self.copies.flush()  # the checkpoint refers to them
        meta = {
            "algorithm": self.algorithm.name,
            "hyper": dict(self.algorithm.hyper),
            "num_clients": self.num_clients,
            "seed": self.seed,
            "session": self.session,
            "round": self.round,
            "times_asked": self.times_asked.tolist(),
            "last_applied": self.last_applied.tolist(),
            "history": self.history,
            "copies": self.copies.path.name if self.copies is not None else None,
        }
        ckpt.save(self.checkpoint, arrays, meta)

    def resume(self, path: str | Path) -> int:
        """Load a checkpoint; return the number of rounds it had completed.

        Every client is resynced on its next round: it may have lost its state
        with the old run, or hold increments of rounds after the checkpoint.
        """
        arrays, meta = ckpt.load(Path(path))
        expected = {"algorithm": self.algorithm.name, "num_clients": self.num_clients, "seed": self.seed}
        for key, value in expected.items():
            if meta[key] != value:
                raise ValueError(f"checkpoint {str(path)!r} has {key}={meta[key]!r}, this run has {value!r}")
        self.session = str(meta["session"])
        self.times_asked = np.asarray(meta["times_asked"], dtype=np.int64)
        self.last_applied = np.asarray(meta["last_applied"], dtype=np.int64)
        self._init_state(arrays["params"], new_copies=False)
        self.server_state = {g.removeprefix("server."): v for g, v in arrays.items() if g.startswith("server.")}
        if self.algorithm.memory is not None:
            name = meta.get("copies")
            if name is None and "shadow.0" in arrays:  # written before the copies file: they are inside
                self.copies = self._open_copies(self.params, create=True)
                for i in range(self.num_clients):
                    self.copies.put(i, arrays[f"shadow.{i}"], int(self.last_applied[i]))
            elif name is None:
                raise ValueError(f"checkpoint {str(path)!r} has no copies file of the clients' memories")
            else:
                source = MemoryCopies(Path(path).with_name(name), self.params, self.num_clients, slots=2, create=False)
                if self.checkpoint is not None and source.path.resolve() == self._copies_path().resolve():
                    self.copies = source  # carry on in the same file
                else:  # carry on in a file of this strategy's own
                    self.copies = self._open_copies(self.params, create=True)
                    for i in range(self.num_clients):
                        self.copies.put(i, source.get(i, int(self.last_applied[i])), int(self.last_applied[i]))
                    source.close()
        if self.audit:
            self._audit_v = {i: self.server_copy(i) for i in range(self.num_clients)}
        self.round = int(meta["round"])
        self.history = list(meta["history"])
        # A client may hold increments of rounds this checkpoint never saw.
        self.needs_resync = set(range(self.num_clients)) if self.algorithm.memory is not None else set()
        return self.round

    # --- nodes ----------------------------------------------------------------

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

    def _query(self, grid: Grid, nodes: list[int]) -> dict[int, int]:
        # With the scenario, the nodes also build their problem now: a node's first
        # training round is then not slower than the others (round-timeout).
        query = {R.SCENARIO: self._scenario_json} if self._scenario_json is not None else {}
        msgs = [
            Message(RecordDict({R.CONFIG: ConfigRecord(query)}), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in nodes
        ]
        mapping: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=self.node_wait_timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d failed the handshake: %s", nid, reply.error.reason)
                continue
            cfg = reply.content[R.CONFIG]
            i, n = int(cfg[PARTITION_ID]), int(cfg.get(NUM_PARTITIONS, -1))
            if n not in (-1, self.num_clients) or not 0 <= i < self.num_clients:
                raise ClientSetupError(
                    f"node {nid} says partition-id={i} num-partitions={n}, but num-clients={self.num_clients}"
                )
            mapping[nid] = i
        return mapping

    def handshake(self, grid: Grid) -> None:
        """Learn which client index (partition-id) every node holds."""
        nodes = self._wait_for_nodes(grid)
        if self._scenario_json is None:  # a foreign ClientApp: no query handler, number the nodes
            self.client_of_node = {nid: i for i, nid in enumerate(sorted(nodes)[: self.num_clients])}
            return
        mapping = self._query(grid, nodes)
        ids = sorted(mapping.values())
        if ids != list(range(self.num_clients)):
            raise ClientSetupError(f"nodes must hold partition-id 0..{self.num_clients - 1} once each, got {ids}")
        self.client_of_node = mapping
        log(INFO, "fl-clip21: %d nodes hold clients 0..%d", len(mapping), self.num_clients - 1)

    def _sync_nodes(self, grid: Grid) -> None:
        """Follow nodes that left or (re)joined: a client on a new node is resynced."""
        if not self.client_of_node:
            self.handshake(grid)
            return
        nodes = set(grid.get_node_ids())
        for nid in set(self.client_of_node) - nodes:
            log(WARNING, "node %d (client %d) left", nid, self.client_of_node.pop(nid))
        new = sorted(nodes - set(self.client_of_node))
        if not new:
            return
        if self._scenario_json is None:  # numbered nodes: a new node takes a free index
            free = sorted(set(range(self.num_clients)) - set(self.client_of_node.values()))
            found = dict(zip(new, free))
        else:
            found = self._query(grid, new)
        for nid, i in found.items():
            for old in [o for o, c in self.client_of_node.items() if c == i]:
                del self.client_of_node[old]
            self.client_of_node[nid] = i
            if self.last_applied[i] > 0:
                self.needs_resync.add(i)
            log(INFO, "node %d now holds client %d", nid, i)

    def sample_clients(self, server_round: int) -> list[int]:
        """The client indices that take part in ``server_round`` (seeded)."""
        return sample_clients(self.seed, server_round, self.num_clients, self.fraction, self.availability)

    # --- late replies -----------------------------------------------------------

    def _sent_messages(self, messages: list[Message]) -> list[Message]:
        self._sent = messages
        return messages

    def _note_late(self, answered: set[str]) -> None:
        """Remember this round's messages whose reply did not come (``answered``: ids replied to)."""
        for msg in self._sent:
            if msg.metadata.message_id and msg.metadata.message_id not in answered:
                self._late[msg.metadata.dst_node_id] = msg.metadata.message_id
        self._sent = []

    def await_late_replies(self, grid: Grid, nodes: Iterable[int] | None = None) -> None:
        """Wait until the late replies of ``nodes`` (default: all) came in, and drop them."""
        wanted = set(self._late) if nodes is None else set(nodes)
        waiting = {nid: mid for nid, mid in self._late.items() if nid in wanted}
        if not waiting:
            return
        deadline = time.monotonic() + self.late_reply_wait
        ids = set(waiting.values())
        while ids and time.monotonic() < deadline:
            for reply in grid.pull_messages(ids):
                ids.discard(reply.metadata.reply_to_message_id)
            if ids:
                time.sleep(0.02)
        for nid, mid in waiting.items():
            del self._late[nid]
            if mid in ids:
                log(WARNING, "node %d: no reply to message %s within %.0f s; messaging it again", nid, mid,
                    self.late_reply_wait)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's :meth:`Strategy.start`, then a wait for late replies (the nodes may serve another run next)."""
        result = super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )
        self.await_late_replies(grid)
        return result

    # --- Strategy interface ---------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.params is None:
            self._init_state(R.from_record(arrays))
        self._sync_nodes(grid)
        k = self.round + 1
        node_of_client = {c: nid for nid, c in self.client_of_node.items()}
        clients = self.sample_clients(k)
        self.times_asked[clients] += 1  # asked, whether or not its node is there: never undercount epsilon
        self._asked = {node_of_client[c]: c for c in clients if c in node_of_client}
        self.await_late_replies(grid, self._asked)
        self._expected = len(clients)
        self._round_start = time.perf_counter()
        base = dict(config)
        base.update({R.ROUND: k, R.DO_AUDIT: self.audit, R.SESSION: self.session})
        if self._scenario_json is not None:
            base.update({R.ALGORITHM: self.algorithm.name, R.SCENARIO: self._scenario_json})
        elif "tau" in self.algorithm.hyper:
            base[R.TAU] = float(self.algorithm.hyper["tau"])
        model = R.to_record(self.params)
        messages = []
        for nid, c in self._asked.items():
            content = RecordDict({R.ARRAYS: model, R.CONFIG: ConfigRecord({**base, R.ACK: int(self.last_applied[c])})})
            if c in self.needs_resync:
                content[R.RESYNC] = R.to_record(self.server_copy(c))
            messages.append(Message(content, dst_node_id=nid, message_type=MessageType.TRAIN))
        return self._sent_messages(messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.params is not None and self.server_state is not None
        k = self.round + 1
        accepted: list[dict[str, np.ndarray]] = []
        rejected = failed = clipped = bytes_up = resyncs = 0
        applied: set[int] = set()  # clients whose increment was applied
        responded: set[int] = set()
        memory_gap = 0.0  # audit: largest |v_i - server's copy| of the memories clients started from
        answered: set[str] = set()
        # The SuperLink answers for a node that went away with an error reply of its
        # own (src_node_id is the SuperLink's): such a reply is the node's by its id.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent if m.metadata.message_id}
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error():
                nid = sent_to.get(reply.metadata.reply_to_message_id, nid)
            answered.add(reply.metadata.reply_to_message_id)
            c = self._asked.get(nid)
            duplicate = nid in responded
            responded.add(nid)
            if reply.has_error():
                failed += 1
                log(WARNING, "round %d: node %d replied with an error: %s", k, nid, reply.error.reason)
                continue
            metrics = R.get_record(reply.content, R.METRICS, MetricRecord)
            record = R.get_record(reply.content, R.ARRAYS, ArrayRecord)
            if record is not None:
                bytes_up += R.payload_bytes(record)
            if c is not None and metrics is not None and int(metrics.get(R.NEEDS_RESYNC, 0)) and not duplicate:
                resyncs += 1
                log(WARNING, "round %d: client %d (node %d) lost its memory: resync next time", k, c, nid)
                continue
            reply_round = int(metrics.get(R.ROUND, -1)) if metrics is not None else -1
            if c is None:
                arrays, reason = None, "node was not asked this round"
            elif duplicate:
                arrays, reason = None, "duplicate reply"
            elif reply_round != k:
                arrays, reason = None, f"reply is for round {reply_round}, this is round {k}"
            else:
                arrays, reason = check_message(record, self.params, self._bound, self.algorithm.sparse)
            audit = self.audit and c is not None and not duplicate
            start_record = R.get_record(reply.content, R.AUDIT_START, ArrayRecord) if audit else None
            if start_record is not None:
                start = R.from_record(start_record)
                memory_gap = max(memory_gap, core.max_abs_diff(start, self.server_copy(c)))
                self._audit_v[c] = start  # what it holds until it is resynced, if this reply is not applied
            if arrays is None:
                rejected += 1
                log(WARNING, "round %d: rejected the message of node %d: %s", k, nid, reason)
                continue
            accepted.append(arrays)
            clipped += int(metrics.get("clipped", 0)) if metrics is not None else 0
            if self.algorithm.memory is not None:
                self.copies.add(c, arrays, int(self.last_applied[c]), k)
                self.last_applied[c] = k
                applied.add(c)
                end_record = R.get_record(reply.content, R.AUDIT_END, ArrayRecord) if audit else None
                if end_record is not None:
                    self._audit_v[c] = R.from_record(end_record)
        failed += self._expected - len(responded & set(self._asked))  # replies that never came
        if self.algorithm.memory is not None:
            # A client asked this round whose increment was not applied may hold it in
            # its memory: its next message carries the server's copy.
            self.needs_resync -= applied
            self.needs_resync |= set(self._asked.values()) - applied
        self._note_late(answered)
        self.params, self.server_state = self.algorithm.server_update(
            self.params, self.server_state, accepted, self.num_clients
        )
        self.round = k
        record: dict[str, Any] = {
            "round": k,
            "participants": self._expected,
            "accepted": len(accepted),
            "clip_fraction": clipped / len(accepted) if accepted else 0.0,
            "rejected": rejected,
            "failed": failed,
            "resyncs": resyncs,
            "bytes_up": bytes_up,
            "seconds": time.perf_counter() - self._round_start,
        }
        if self.audit:
            record["invariant_gap"] = self.invariant_gap()
            record["memory_gap"] = memory_gap
        record.update(round_epsilon(self.algorithm, self.times_asked, self.delta))
        if self.evaluate is not None:
            record.update(self.evaluate(self.params))
        self.history.append(record)
        if self.checkpoint is not None:
            self.save_checkpoint()
        if self.on_round is not None:
            self.on_round(record)
        return R.to_record(self.params), MetricRecord({k2: v for k2, v in record.items() if k2 != "round"})

    def invariant_gap(self) -> float:
        """max |g - (1/n) sum_i v_i| over the memories the clients last reported."""
        assert self.server_state is not None
        return core.max_abs_diff(self.server_state["g"], core.mean(list(self._audit_v.values())))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0 or not self.client_of_node:
            return []
        nodes = sorted(self.client_of_node)
        m = max(1, int(round(self.fraction_evaluate * len(nodes))))
        rng = np.random.default_rng([self.seed, 0xE7A1, self.round])
        chosen = sorted(int(nodes[j]) for j in rng.choice(len(nodes), size=m, replace=False))
        cfg = ConfigRecord({**dict(config), R.ROUND: self.round})
        self.await_late_replies(grid, chosen)
        return self._sent_messages([
            Message(RecordDict({R.ARRAYS: arrays, R.CONFIG: cfg}), dst_node_id=nid, message_type=MessageType.EVALUATE)
            for nid in chosen
        ])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._note_late({r.metadata.reply_to_message_id for r in replies})
        records = [r.content for r in replies if not r.has_error() and r.content.metric_records]
        if not records:
            return None
        return aggregate_metricrecords(records, "num-examples")

    def summary(self) -> None:
        log(
            INFO,
            "\t%s on %d clients, fraction %.3g, hyper-parameters %s",
            self.algorithm.name, self.num_clients, self.fraction, dict(self.algorithm.hyper),
        )
