"""A Message-API Flower Strategy that runs any fl-clip21 algorithm.

The strategy holds the model x and the algorithm's server state (Clip21's
aggregate g). Each round it samples clients, sends x, checks every reply
before using it, and applies the algorithm's server update to the accepted
replies. It keeps configure and aggregate and composes the rest, each part in
its own module:

- :mod:`~fl_clip21.flower.validation`: every field of a reply decoded and
  checked; a reply that fails is counted (``rejected``), logged with its node
  id and client index, and changes nothing;
- :mod:`~fl_clip21.flower.nodes` and :mod:`~fl_clip21.flower.registry`: the
  handshake with the nodes, which node holds which client, and whether a node
  that takes a client over proved it is that client;
- :mod:`~fl_clip21.flower.protocol`: the consistency protocol's acks, copies
  of the clients' memories (in a file), resyncs and resets; who is resynced,
  and the round's record, come from :mod:`fl_clip21.fault_protocol`, which the
  batched engines use too;
- :mod:`~fl_clip21.flower.late`: replies that missed their round;
- :mod:`~fl_clip21.flower.saved_state`: with ``checkpoint``, the state saved
  after every round, atomically, and checked and restored by :meth:`resume`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from fl_clip21 import core
from fl_clip21.algorithms import Algorithm, model_size
from fl_clip21.copies import MemoryCopies
from fl_clip21.core import Params
from fl_clip21.engine import sample_clients, server_noise
from fl_clip21.fault_protocol import round_record
from fl_clip21.flower import metrics as client_metrics
from fl_clip21.flower import records as R
from fl_clip21.flower import saved_state
from fl_clip21.flower import validation as V
from fl_clip21.flower.late import LateReplies
from fl_clip21.flower.nodes import ClientSetupError, NodeSync
from fl_clip21.flower.protocol import Audit, ProtocolState
from fl_clip21.flower.registry import Binding
from fl_clip21.layout import Layout

__all__ = ["Clip21Strategy", "ClientSetupError", "setup_reason"]

# Error replies of a ClientApp that fails the same way every round (not a lost or late reply).
SETUP_ERRORS = frozenset({
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.MOD_FAILED_PRECONDITION,
})
# What differs between nodes failing the same way: paths (a node's data file), hex ids, numbers (node ids, ports).
_NODE_SPECIFIC = re.compile(r"(?:[A-Za-z]:)?(?:[\w.~-]*[/\\])+[\w.~-]*|\b0x[0-9a-fA-F]+\b|\b\d+(?:\.\d+)?\b")


def _check(name: str, value: object, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


def setup_reason(code: int, reason: str) -> tuple[str, str] | None:
    """``(what every node failing this way has in common, the reason)`` of an error reply, or None.

    None for an error a later round may not see (a lost or late reply, a node
    that left). For a ClientApp that could not be loaded, raised, or whose mod
    refused the message, the error code and the reason with its paths and
    numbers blanked out: two nodes whose data files differ fail the same way.
    """
    if code not in SETUP_ERRORS:
        return None
    return f"{code}: {_NODE_SPECIFIC.sub('#', reason)}", reason


def _stop_if_no_round_can_succeed(reasons: list[tuple[str, str] | None], k: int) -> None:
    """:class:`ClientSetupError` when every reply of round ``k`` failed the same way, one no later round can fix."""
    if reasons and None not in reasons and len({common for common, _ in reasons}) == 1:
        raise ClientSetupError(
            f"round {k}: every reply failed for the same reason, which no later round can fix: {reasons[0][1]}"
        )


@dataclass
class _Tally:
    """What a round's replies amount to, as they are read."""

    accepted: list[Params] = field(default_factory=list)  # the messages applied
    norms: list[tuple[float, float]] = field(default_factory=list)
    app_metrics: list[dict] = field(default_factory=list)
    rejected: int = 0
    failed: int = 0
    clipped: int = 0
    bytes_up: int = 0
    resyncs: int = 0
    setup_reasons: list[tuple[str, str] | None] = field(default_factory=list)  # per reply, see setup_reason
    applied: set[int] = field(default_factory=set)  # clients whose increment was applied
    responded: set[int] = field(default_factory=set)  # nodes
    answered: set[str] = field(default_factory=set)  # message ids


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
        None (the default; only for apps without the partition-id handshake,
        ``scenario`` None, else a ValueError): n is counted at the first
        round, as the nodes connected once ``min_available_nodes`` are (as
        FedAvg samples among them), and fixed for the run; a node that joins
        later takes the index of a client whose node left. :meth:`resume`
        takes n from the checkpoint.
    min_available_nodes:
        With ``num_clients`` None, the nodes to wait for before the first round.
    sampling:
        ``fixed``: round(fraction x n) clients a round; ``poisson``: each with
        probability ``fraction`` (central DP's accountant then amplifies).
    fraction:
        Share of clients sampled per round (seeded by ``seed`` and the round).
    audit:
        Clients also return their memory; each round reports ``invariant_gap`` =
        max |g - mean_i v_i| over the memories the clients last reported.
    node_wait_timeout:
        Seconds to wait for all ``num_clients`` partitions to be held at the
        start (for the nodes to be counted, too, without ``num_clients``).
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
        1 (FedAvg's default) asks every node; 0 skips client-side evaluation
        (``evaluate_fn`` of :meth:`start` still runs).
    availability:
        Probability that a client is online in a round; each round samples
        among the online clients (:func:`~fl_clip21.engine.sample_clients`).
    late_reply_wait:
        Longest wait, in seconds, for the late reply of a node before sending
        that node another message (:mod:`~fl_clip21.flower.late`).
    copies_dir:
        Folder for the copies file of a run without ``checkpoint`` (default:
        a new temporary folder, removed with the strategy).
    node_keys:
        Canonical SuperNode public key -> partition
        (:func:`fl_clip21.flower.identity.load_node_keys`): a node may hold a
        partition only if the SuperLink authenticated it with that partition's
        key (start the SuperLink with ``--enable-supernode-auth``).
    trust_partition_ids:
        Whether a node's partition-id claim proves it holds that client. None
        (default): only on Flower's simulation engine, which makes the nodes
        and their partition-ids itself. Otherwise a node taking a client over
        is proven only by being the node it was bound to, or by its key.
    config:
        The resolved configuration to save with every checkpoint and compare
        on :meth:`resume` (default: ``scenario``).
    """

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        scenario: dict[str, Any] | None,
        num_clients: int | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        audit: bool = False,
        node_wait_timeout: float = 600.0,
        client_of_node: dict[int, int] | None = None,
        delta: float = 1e-5,
        checkpoint: str | Path | None = None,
        evaluate: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        fraction_evaluate: float = 1.0,
        availability: float = 1.0,
        late_reply_wait: float = 600.0,
        copies_dir: str | Path | None = None,
        node_keys: Mapping[bytes, int] | None = None,
        trust_partition_ids: bool | None = None,
        config: Mapping[str, Any] | None = None,
        min_available_nodes: int = 2,
        sampling: str = "fixed",
    ) -> None:
        _check("fraction_evaluate", fraction_evaluate, 0 <= fraction_evaluate <= 1, "must be in [0, 1]")
        _check("fraction", fraction, 0 < fraction <= 1, "must be in (0, 1]")
        _check("availability", availability, 0 < availability <= 1, "must be in (0, 1]")
        if num_clients is None:
            _check("num_clients", num_clients, scenario is None, "may be left out only without a scenario (clip21_mod apps)")
            _check("min_available_nodes", min_available_nodes,
                   isinstance(min_available_nodes, int) and min_available_nodes >= 1, "must be an integer >= 1")
            _check("client_of_node", client_of_node, not client_of_node, "needs num_clients")
        else:
            _check("num_clients", num_clients, isinstance(num_clients, int) and num_clients >= 1,
                   "must be an integer >= 1")
        _check("sampling", sampling, sampling in ("fixed", "poisson"), "must be 'fixed' or 'poisson'")
        _check("delta", delta, 0 < delta < 1, "must be in (0, 1)")
        self.sampling = sampling
        self.algorithm = algorithm
        self.num_clients: int | None = num_clients
        self.fraction = fraction
        self.availability = availability
        self.seed = seed
        self.audit = audit and algorithm.memory is not None
        self.delta = delta
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.copies_dir = Path(copies_dir) if copies_dir is not None else None
        self.evaluate = evaluate
        self.fraction_evaluate = fraction_evaluate
        self.on_round = on_round
        self._scenario_json = json.dumps(scenario, sort_keys=True) if scenario is not None else None
        self.config = dict(config if config is not None else scenario or {})
        self.session = uuid.uuid4().hex[:16]  # scopes the clients' state to this run of this algorithm
        # With the scenario, the nodes also build their problem at the handshake: a node's first
        # training round is then not slower than the others (round-timeout).
        self.nodes = NodeSync(
            num_clients=num_clients, handshake=scenario is not None,
            query={R.SCENARIO: self._scenario_json} if self._scenario_json is not None else {},
            wait_timeout=node_wait_timeout, node_keys=node_keys, trust_partition_ids=trust_partition_ids,
            min_available_nodes=min_available_nodes,
        )
        self.protocol = ProtocolState(num_clients or 1)  # sized again once n is counted (num_clients None)
        for nid, c in (client_of_node or {}).items():
            self.nodes.registry.claim(int(nid), int(c), connected=())
        self.late = LateReplies(late_reply_wait)
        self.audit_state: Audit | None = None
        self.params: dict[str, np.ndarray] | None = None
        self.server_state: dict | None = None
        self.round = 0  # the last round completed
        self.history: list[dict[str, Any]] = []
        self._bound: float | None = None
        self.layout: Layout | None = None
        self._sparse_k: int | None = None
        # This round's state: the nodes asked and their clients, how many were sampled, when it started.
        self._asked: dict[int, int] = {}
        self._grid: Grid | None = None
        self._expected = 0
        self._round_start = time.perf_counter()

    def _size(self, num_clients: int) -> None:
        """Registry and protocol state for ``num_clients`` clients."""
        self.num_clients = num_clients
        self.nodes.resize(num_clients)
        self.protocol = ProtocolState(num_clients)

    @property
    def client_of_node(self) -> dict[int, int]:
        """Node id -> client index of the nodes connected and bound now."""
        return self.nodes.registry.client_of_node if self.nodes.registry is not None else {}

    # --- state ----------------------------------------------------------------

    def _copies_path(self) -> Path:
        if self.checkpoint is not None:
            return saved_state.copies_path(self.checkpoint)
        folder = self.copies_dir
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="fl-clip21-copies-"))
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        return folder / f"{self.algorithm.name}.{self.session}.copies"

    def _open_copies(self, params: dict[str, np.ndarray]) -> MemoryCopies:
        """A new copies file for this run (every copy zero)."""
        return MemoryCopies(
            self._copies_path(), params, self.num_clients,
            slots=saved_state.SLOTS if self.checkpoint is not None else 1, create=True,
        )

    def _init_state(self, params: dict[str, np.ndarray], copies: MemoryCopies | None = None) -> None:
        self.params = params
        self.layout = Layout.of(params)
        self.server_state = {
            k: self.layout.unflatten(v)
            for k, v in self.algorithm.server_init(self.layout.size, self.layout.dtype).items()
        }
        if self.algorithm.memory is not None:
            copies = copies if copies is not None else self._open_copies(params)
            self.protocol = ProtocolState(self.num_clients, copies, layout=params)
        if self.audit:  # the memories the clients reported (only when auditing: n more copies)
            self.audit_state = Audit({i: core.zeros_like(params) for i in range(self.num_clients)})
        d = model_size(params)
        bound = self.algorithm.message_bound
        self._bound = bound(d) if bound is not None else None
        self._sparse_k = self.algorithm.sparse_entries(d) if self.algorithm.sparse else None

    def server_copy(self, client: int) -> dict[str, np.ndarray]:
        """The server's copy of ``client``'s memory (the sum of its increments applied)."""
        return self.protocol.copy(client)

    def _meta(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm.name,
            "hyper": dict(self.algorithm.hyper),
            "num_clients": self.num_clients,
            "seed": self.seed,
            "config": self.config,
            "session": self.session,
            "round": self.round,
            "history": self.history,
            "protocol": self.protocol.state_dict(),
            "registry": self.nodes.registry.state_dict(),
            "copies": self.protocol.copies.path.name if self.protocol.copies is not None else None,
        }

    def save_checkpoint(self) -> None:
        """Write the server's whole state to :attr:`checkpoint` (atomically; :mod:`~fl_clip21.flower.saved_state`)."""
        if self.checkpoint is None or self.params is None or self.server_state is None:
            raise RuntimeError("save_checkpoint needs a checkpoint path and a started run")
        saved_state.save(self.checkpoint, self.params, self.server_state, self._meta(), self.protocol.copies)

    def resume(self, path: str | Path) -> int:
        """Load a checkpoint; return the number of rounds it had completed.

        The checkpoint must have been made by this algorithm with the same
        hyper-parameters, clients, seed and configuration: any difference is a
        :class:`~fl_clip21.checkpoint.CheckpointError` (a ValueError) naming the
        key and both values, as is a corrupted file; a corrupted or foreign
        copies file is a :class:`~fl_clip21.copies.CopiesError`. Every client
        is resynced on its next round: it may have lost its state with the old
        run, or hold increments of rounds after the checkpoint.
        """
        path = Path(path)
        saved = saved_state.load(
            path, algorithm=self.algorithm.name, hyper=self.algorithm.hyper, num_clients=self.num_clients,
            seed=self.seed, config=self.config,
        )
        if self.num_clients is None:
            self._size(saved.num_clients)
        with saved_state.malformed(path):
            copies = None
            if self.algorithm.memory is not None:
                copies = saved_state.restore_copies(
                    path, saved, new=lambda: self._open_copies(saved.params),
                    carry_on_in=self._copies_path() if self.checkpoint is not None else None,
                )
            self.session = saved.session
            self._init_state(saved.params, copies)
            self.server_state = saved.server_state
            self.protocol.load_state_dict(saved.protocol)
            self.nodes.registry.load_state_dict(saved.registry)
        if self.audit_state is not None:
            self.audit_state.memories = {i: self.server_copy(i) for i in range(self.num_clients)}
        self.round = saved.round
        self.history = saved.history
        return self.round

    # --- nodes ----------------------------------------------------------------

    def _took_over(self, binding: Binding) -> None:
        """A node now holds ``binding.client``: it gets the server's copy, or, unproven, a reset."""
        c, nid = binding.client, binding.node
        if self.algorithm.memory is None or not binding.new or not self.protocol.has_history(c):
            return
        if binding.proven:
            self.protocol.needs_resync.add(c)
            log(INFO, "node %d now holds client %d: it is sent the server's copy of its memory", nid, c)
            return
        old = self.protocol.reset(c)
        g = self.server_state["g"]
        self.server_state = {**self.server_state, "g": core.add(g, old, -1.0 / self.num_clients)}
        if self.audit_state is not None:
            self.audit_state.memories[c] = core.zeros_like(old)
        log(
            WARNING,
            "node %d took client %d over without proving it is that client (no SuperNode key, not the node it was "
            "bound to): the client's memory is reset to zero and removed from g", nid, c,
        )

    def _sync_nodes(self, grid: Grid) -> None:
        """Follow nodes that left or joined; a node taking a client over is resynced or reset."""
        for binding in self.nodes.sync(grid):
            if self.params is not None:
                self._took_over(binding)

    def handshake(self, grid: Grid) -> None:
        """Wait until every client index (partition) is held by a node (:meth:`NodeSync.wait_for_all`).

        Without ``num_clients``, n is first counted: the nodes connected once
        ``min_available_nodes`` are.
        """
        deadline = self.nodes.deadline()  # one wait for both
        if self.num_clients is None:
            self._size(self.nodes.count(grid, deadline))
        for binding in self.nodes.wait_for_all(grid, deadline):
            if self.params is not None:  # a resumed run: its clients' copies exist
                self._took_over(binding)

    def sample_clients(self, server_round: int) -> list[int]:
        """The client indices that take part in ``server_round`` (seeded)."""
        return sample_clients(
            self.seed, server_round, self.num_clients, self.fraction, self.availability, self.sampling == "poisson",
            bool(self.config.get("secure-noise", False)),
        )

    def await_late_replies(self, grid: Grid, nodes: Iterable[int] | None = None) -> None:
        """Wait until the late replies of ``nodes`` (default: all) came in, and drop them."""
        self.late.await_nodes(grid, nodes)

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
        self._grid = grid
        if not self.client_of_node:  # a new run, or a resumed one
            self.handshake(grid)
        if self.params is None:
            self._init_state(R.from_record(arrays))
        else:
            self._sync_nodes(grid)
        k = self.round + 1
        clients = self.sample_clients(k)
        self.protocol.times_asked[clients] += 1  # asked, whether or not its node is there: never undercount epsilon
        self._asked = {nid: c for c in clients if (nid := self.nodes.registry.node_of(c)) is not None}
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
            content = RecordDict({R.ARRAYS: model, R.CONFIG: ConfigRecord({**base, R.ACK: self.protocol.ack(c)})})
            if c in self.protocol.needs_resync:
                content[R.RESYNC] = R.to_record(self.server_copy(c))
            messages.append(Message(content, dst_node_id=nid, message_type=MessageType.TRAIN))
        return self.late.sending(messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.params is None or self.server_state is None:
            raise RuntimeError("aggregate_train before configure_train: the strategy has no model yet")
        k = self.round + 1
        tally = _Tally()
        sent_to = self.late.destinations()
        for reply in replies:
            self._read_reply(reply, k, sent_to, tally)
        tally.failed += self._expected - len(tally.responded & set(self._asked))  # replies that never came
        _stop_if_no_round_can_succeed(tally.setup_reasons, k)
        if self.algorithm.memory is not None:
            self.protocol.end_round(set(self._asked.values()), tally.applied)
        self.late.round_over(tally.answered, self._grid)
        self._server_step(tally.accepted)
        self.round = k
        record = self._record(k, tally)
        self.history.append(record)
        if self.checkpoint is not None:
            self.save_checkpoint()
        if self.on_round is not None:
            self.on_round(record)
        own = {f"{R.PREFIX}{key}": v for key, v in record.items() if key not in ("round", "train_metrics")}
        # The app's keys never carry fl-clip21's prefix (validation drops them); own keys go last all the same.
        return R.to_record(self.params), MetricRecord({**record.get("train_metrics", {}), **own})

    def _read_reply(self, reply: Message, k: int, sent_to: Mapping[str, int], tally: _Tally) -> None:
        """Count ``reply`` in ``tally`` and, if it passes every check, apply it (its client's copy)."""
        nid = reply.metadata.src_node_id
        if reply.has_error():
            # The SuperLink answers for a node that went away with an error reply of its
            # own (src_node_id is the SuperLink's): such a reply is the node's by its id.
            nid = sent_to.get(reply.metadata.reply_to_message_id, nid)
        tally.answered.add(reply.metadata.reply_to_message_id)
        c = self._asked.get(nid)
        duplicate = nid in tally.responded
        tally.responded.add(nid)
        if reply.has_error():
            tally.failed += 1
            log(WARNING, "round %d: node %d replied with an error: %s", k, nid, reply.error.reason)
            tally.setup_reasons.append(setup_reason(reply.error.code, reply.error.reason))
            return
        tally.bytes_up += V.payload_bytes(reply.content.get(R.ARRAYS))
        try:
            decoded = self._decode(reply, k, c, nid, duplicate)
        except V.ReplyError as e:
            tally.rejected += 1
            log(WARNING, "round %d: rejected the reply of node %d (client %s): %s", k, nid, c, e)
            tally.setup_reasons.append((str(e), str(e)) if isinstance(e, V.NotClip21Reply) else None)
            return
        tally.setup_reasons.append(None)
        self._apply(decoded, k, c, nid, tally)

    def _decode(self, reply: Message, k: int, client: int | None, node: int, duplicate: bool) -> V.TrainReply:
        """The reply of ``client`` (on ``node``) decoded and checked (:class:`ReplyError` if it cannot be used)."""
        if client is None:
            raise V.ReplyError("node was not asked this round")
        if duplicate:
            raise V.ReplyError("duplicate reply")
        try:
            decoded = V.decode_train_reply(reply.content, self.params, self._bound, self._sparse_k, self.audit)
        except V.ReplyError:
            raise
        except Exception as e:  # noqa: BLE001 - a client's bytes must never stop the server
            log(ERROR, "round %d: node %d (client %d): reply could not be decoded", k, node, client, exc_info=True)
            raise V.ReplyError(f"malformed reply ({type(e).__name__}: {e})") from None
        if not decoded.needs_resync and decoded.round != k:
            raise V.ReplyError(f"reply is for round {decoded.round}, this is round {k}")
        return decoded

    def _apply(self, decoded: V.TrainReply, k: int, c: int, nid: int, tally: _Tally) -> None:
        """An accepted reply of client ``c``: its increment into its copy, its figures into ``tally``."""
        if self.audit_state is not None and decoded.audit_start is not None:
            self.audit_state.started(c, decoded.audit_start, self.server_copy(c))
        if decoded.needs_resync:
            tally.resyncs += 1
            log(WARNING, "round %d: client %d (node %d) lost its memory: resync next time", k, c, nid)
            return
        tally.accepted.append(decoded.message)
        tally.clipped += int(decoded.clipped)
        if decoded.norms is not None:
            tally.norms.append(decoded.norms)
        if decoded.metrics:
            tally.app_metrics.append(decoded.metrics)
        if decoded.left_out:
            log(WARNING, "round %d: node %d (client %d): left out of the app's metrics: %s", k, nid, c, decoded.left_out)
        if self.algorithm.memory is not None:
            self.protocol.apply(c, decoded.message, k)
            tally.applied.add(c)
            if self.audit_state is not None and decoded.audit_end is not None:
                self.audit_state.ended(c, decoded.audit_end)

    def _record(self, k: int, tally: _Tally) -> dict[str, Any]:
        """Round ``k``'s record (history, checkpoint, progress) from its tally and the new state."""
        seconds = time.perf_counter() - self._round_start
        audit = None
        if self.audit_state is not None:
            audit = {"invariant_gap": self.invariant_gap(), "memory_gap": self.audit_state.take_round()}
        record = round_record(
            k, self.algorithm, participants=self._expected, accepted=len(tally.accepted), clipped=tally.clipped,
            rejected=tally.rejected, failed=tally.failed, resyncs=tally.resyncs, bytes_up=tally.bytes_up,
            seconds=seconds, times_asked=self.protocol.times_asked,
            delta=self.delta, norms=tally.norms, audit=audit,
        )
        train_metrics = client_metrics.aggregate(tally.app_metrics)
        if train_metrics:
            record["train_metrics"] = train_metrics
        if self.evaluate is not None:
            record.update(self.evaluate(self.params))
        return record

    def _server_step(self, accepted: list[dict[str, np.ndarray]]) -> None:
        """The algorithm's server step with the round's accepted messages, on flat vectors."""
        layout = self.layout
        x, state = self.algorithm.server_round(
            layout.flatten(self.params), {k: layout.flatten(v) for k, v in self.server_state.items()},
            layout.flatten_rows(accepted) if accepted else layout.zeros(0), self.num_clients,
            noise=server_noise(self.seed, self.round + 1, layout.size),
        )
        self.params = layout.unflatten(x)
        self.server_state = {k: layout.unflatten(v) for k, v in state.items()}

    def invariant_gap(self) -> float:
        """max |g - (1/n) sum_i v_i| over the memories the clients last reported."""
        if self.audit_state is None or self.server_state is None:
            raise RuntimeError("invariant_gap needs an audited, started run")
        return self.audit_state.invariant_gap(self.server_state["g"])

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
        return self.late.sending([
            Message(RecordDict({R.ARRAYS: arrays, R.CONFIG: cfg}), dst_node_id=nid, message_type=MessageType.EVALUATE)
            for nid in chosen
        ])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.late.round_over({r.metadata.reply_to_message_id for r in replies}, self._grid)
        records = [
            {k: v for m in r.content.metric_records.values() for k, v in m.items()}
            for r in replies if not r.has_error()
        ]
        aggregated = client_metrics.aggregate([r for r in records if r])
        return MetricRecord(aggregated) if aggregated else None

    def summary(self) -> None:
        log(
            INFO,
            "\t%s on %d clients, fraction %.3g, hyper-parameters %s",
            self.algorithm.name, self.num_clients, self.fraction, dict(self.algorithm.hyper),
        )
