"""The strategy's conversation with the Grid about nodes: who is there, and which client each holds.

:class:`NodeSync` asks new nodes which partition they hold (a QUERY
message, the *handshake*), decodes each answer defensively
(:func:`~fl_clip21.flower.validation.decode_handshake`), and hands the claims
to the :class:`~fl_clip21.flower.registry.NodeRegistry`, with the public key
the SuperLink authenticated the node by. A node whose answer is malformed or
whose claim the registry refuses is logged and never asked again this run.

Apps without the handshake (any ClientApp wrapped in
:func:`~fl_clip21.flower.mod.clip21_mod`, no scenario) are numbered instead:
a new node takes the lowest free client index. Without ``num_clients`` the
clients are the nodes connected once ``min_available_nodes`` are (FedAvg's
wait), counted once at the start of the run.

What a take-over means for the server's state (a resync or a reset) is the
strategy's business: :meth:`NodeSync.sync` returns the bindings it made.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fl_clip21.flower import records as R
from fl_clip21.flower import stop
from fl_clip21.flower import validation as V
from fl_clip21.flower.registry import Binding, NodeRegistry, Refused

PROGRESS_EVERY = 5.0  # seconds between "waiting for nodes" lines
POLL = 0.2  # seconds between two looks at the connected nodes while waiting


class ClientSetupError(RuntimeError):
    """The nodes that registered do not form the expected set of clients."""


def on_simulation_engine(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's simulation engine, which assigns every node's partition-id itself."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


class NodeSync:
    """Bind the nodes of a Grid to client indices, for one run.

    Parameters
    ----------
    num_clients:
        n, or None: counted by :meth:`count` (then ``handshake`` must be
        False: only numbered apps may leave it out).
    handshake:
        Whether nodes are asked for their partition-id (fl-clip21's own
        ClientApp); False numbers them in the order of their ids.
    query:
        The ConfigRecord content of the handshake message (fl-clip21's nodes
        build the scenario's problem when they get it).
    wait_timeout:
        Seconds a handshake message and the wait for every partition may take.
    node_keys:
        Canonical public key -> partition (see :class:`NodeRegistry`).
    trust_partition_ids:
        Whether a claim proves the node holds that client; None: only on
        Flower's simulation engine.
    min_available_nodes:
        With ``num_clients`` None, the nodes to wait for before counting.
    """

    def __init__(
        self,
        *,
        num_clients: int | None,
        handshake: bool,
        query: Mapping[str, str] | None = None,
        wait_timeout: float = 600.0,
        node_keys: Mapping[bytes, int] | None = None,
        trust_partition_ids: bool | None = None,
        min_available_nodes: int = 2,
    ) -> None:
        if not wait_timeout > 0:
            raise ValueError(f"node_wait_timeout must be > 0 seconds, got {wait_timeout!r}")
        if num_clients is None and handshake:
            raise ValueError("num_clients may be left out only for apps without the partition-id handshake")
        self.use_handshake = handshake
        self.query = dict(query or {})
        self.wait_timeout = wait_timeout
        self.node_keys = node_keys
        self.trust_partition_ids = trust_partition_ids
        self.min_available_nodes = min_available_nodes
        self.registry: NodeRegistry | None = None
        if num_clients is not None:
            self.resize(num_clients)
        self.refused: set[int] = set()  # nodes whose claim was refused: never asked again this run
        self.handshake_errors: dict[int, str] = {}  # node -> the error its last handshake reply carried

    def resize(self, num_clients: int) -> NodeRegistry:
        """A new, empty registry for ``num_clients`` clients (at the start of a run, or on resume)."""
        self.registry = NodeRegistry(num_clients, node_keys=self.node_keys)
        return self.registry

    def _registry(self) -> NodeRegistry:
        if self.registry is None:
            raise RuntimeError("the number of clients is not known yet: call count() or resize() first")
        return self.registry

    # --- one look at the grid -----------------------------------------------------

    def sync(self, grid: Grid, connected: Collection[int] | None = None) -> list[Binding]:
        """Follow nodes that left or joined; returns the bindings made (new nodes, take-overs)."""
        registry = self._registry()
        trust = self.trust_partition_ids
        registry.trust_claims = on_simulation_engine(grid) if trust is None else trust
        connected = set(grid.get_node_ids()) if connected is None else set(connected)
        for nid, c in registry.forget_gone(connected):
            log(WARNING, "node %d (client %d) left", nid, c)
        new = sorted(connected - set(registry.client_of_node) - self.refused)
        if not new:
            return []
        if not self.use_handshake:
            return registry.bind_numbered(new)
        return self._bind(grid, self._ask(grid, new), connected)

    def _ask(self, grid: Grid, nodes: list[int]) -> dict[int, int]:
        """Ask ``nodes`` which partition they hold; returns the claims that decode (the rest are refused)."""
        n = self._registry().num_clients
        msgs = [
            Message(RecordDict({R.CONFIG: ConfigRecord(self.query)}), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in nodes
        ]
        claims: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=self.wait_timeout):
            nid = reply.metadata.src_node_id
            if nid not in nodes or nid in claims:
                continue
            if reply.has_error():  # the node could not answer now (a crash, a restart): it is asked again
                if self.handshake_errors.get(nid) != reply.error.reason:
                    log(WARNING, "node %d failed the handshake (asked again): %s", nid, reply.error.reason)
                self.handshake_errors[nid] = reply.error.reason
                continue
            try:
                claims[nid] = V.decode_handshake(reply.content, n)
            except V.ReplyError as e:
                log(WARNING, "refused node %d: its handshake reply is malformed: %s", nid, e)
                self.refused.add(nid)
        return claims

    def _bind(self, grid: Grid, claims: dict[int, int], connected: set[int]) -> list[Binding]:
        registry = self._registry()
        keys = self._public_keys(grid, claims) if registry.node_keys is not None else {}
        bindings = []
        for nid, c in claims.items():
            try:
                bindings.append(registry.claim(nid, c, connected, keys.get(nid)))
            except Refused as e:
                log(WARNING, "refused node %d: %s", nid, e)
                self.refused.add(nid)
        return bindings

    @staticmethod
    def _public_keys(grid: Grid, nodes: Iterable[int]) -> dict[int, bytes]:
        """The canonical public key of each of ``nodes``, as the SuperLink authenticated it."""
        from fl_clip21.flower.identity import normalise_public_key

        wanted, out = set(nodes), {}
        for info in grid.get_nodes():
            if info.node_id in wanted and info.public_key:
                try:
                    out[info.node_id] = normalise_public_key(info.public_key)
                except ValueError as e:
                    log(WARNING, "node %d: its public key cannot be read (%s)", info.node_id, e)
        return out

    # --- waiting at the start of a run ----------------------------------------------

    def deadline(self) -> float:
        """The ``time.monotonic()`` by which the nodes must be there, if the wait starts now."""
        return time.monotonic() + self.wait_timeout

    def count(self, grid: Grid, deadline: float | None = None) -> int:
        """n: the nodes connected once ``min_available_nodes`` are (FedAvg's wait); sizes the registry."""
        deadline = self.deadline() if deadline is None else deadline
        next_note = time.monotonic() + PROGRESS_EVERY
        while len(connected := set(grid.get_node_ids())) < self.min_available_nodes:
            now = time.monotonic()
            if now > deadline:
                raise ClientSetupError(
                    f"only {len(connected)} of min_available_nodes={self.min_available_nodes} nodes connected "
                    f"within {self.wait_timeout:.0f} s"
                )
            if now > next_note:
                log(INFO, "fl-clip21: waiting for nodes: %d of %d connected", len(connected), self.min_available_nodes)
                next_note = now + PROGRESS_EVERY
            stop.wait(POLL)  # ends at once, with RunStopped, on SIGINT/SIGTERM
        self.resize(len(connected))
        log(INFO, "fl-clip21: %d nodes connected: num_clients=%d for this run", len(connected), len(connected))
        return len(connected)

    def wait_for_all(self, grid: Grid, deadline: float | None = None) -> list[Binding]:
        """Wait until every client index (partition) is held by a node; returns the bindings made.

        Raises :class:`ClientSetupError` at ``deadline`` (default: ``wait_timeout``
        seconds from now), naming the partitions no node holds and the handshake
        errors seen.
        """
        registry = self._registry()
        n = registry.num_clients
        deadline = self.deadline() if deadline is None else deadline
        next_note = time.monotonic() + PROGRESS_EVERY
        bindings: list[Binding] = []
        while len(registry.bound_clients()) < n:
            connected = set(grid.get_node_ids())
            if self.use_handshake or len(connected) >= n:
                bindings += self.sync(grid, connected)
            if len(registry.bound_clients()) == n:
                break
            now = time.monotonic()
            if now > deadline:
                raise ClientSetupError(self._missing(connected))
            if now > next_note:
                log(INFO, "fl-clip21: waiting for nodes: %s", self.progress(connected))
                next_note = now + PROGRESS_EVERY
            stop.wait(POLL)  # ends at once, with RunStopped, on SIGINT/SIGTERM
        log(INFO, "fl-clip21: %d nodes hold clients 0..%d", len(registry.client_of_node), n - 1)
        return bindings

    def progress(self, connected: Collection[int]) -> str:
        """``3 of 5 nodes connected``, and ``, 2 of 5 partitions held`` once a node holds one."""
        registry = self._registry()
        n, held = registry.num_clients, len(registry.bound_clients())
        line = f"{len(connected)} of {n} nodes connected"
        if held:
            line += f", {held} of {n} partitions held"
        if self.refused:
            line += f", {len(self.refused)} refused"
        return line

    def _missing(self, connected: Collection[int]) -> str:
        registry = self._registry()
        n = registry.num_clients
        missing = sorted(set(range(n)) - registry.bound_clients())
        errors = sorted(set(self.handshake_errors.values()))[:3]
        return (
            f"only {len(registry.bound_clients())} of num-clients={n} partitions are held by a node after "
            f"{self.wait_timeout:.0f} s ({len(connected)} nodes connected, {len(self.refused)} refused); "
            f"no node holds partitions {missing[:20]}"
            + (f"; handshake errors: {errors}" if errors else "")
        )
