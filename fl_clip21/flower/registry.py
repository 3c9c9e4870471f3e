"""Which node holds which client, for one run: partition binding and node identity.

A node says which client (partition) it holds; nothing makes that true. The
registry binds each partition to one node id for the run and decides whether a
node that takes a partition over has *proved* it is that client, because only
such a node may be sent the server's copy of the client's memory v_i:

- a node already bound to the partition (the same node id: a node whose state
  was wiped, or an authenticated SuperNode restarted with its key, which the
  SuperLink gives its old node id back);
- a node whose public key, as the SuperLink authenticated it (Flower's
  SuperNode authentication), maps to the partition in the run's key map;
- any node, when the node ids and partition-ids were made by the engine itself
  (Flower's simulation engine assigns every node's ``partition-id``).

A node claiming a partition whose node is still connected is refused, and so is
a node whose key maps to another partition or to none. Refusals raise
:class:`Refused`; the caller logs them and never sends the node anything.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any


class Refused(ValueError):
    """A node's claim on a partition that the registry does not accept (the reason is the message)."""


@dataclass(frozen=True)
class Binding:
    """The outcome of an accepted claim.

    Attributes
    ----------
    node, client:
        The node id and the client index (partition) it now holds.
    new:
        The partition was not bound to this node a moment ago (a first binding
        or a take-over): the client's memory on the node is unknown.
    proven:
        The node proved it is that client (see the module docstring): it may
        be sent the server's copy of the client's memory.
    """

    node: int
    client: int
    new: bool
    proven: bool


class NodeRegistry:
    """Bindings of ``num_clients`` partitions to node ids.

    Parameters
    ----------
    num_clients:
        n; partitions are 0..n-1.
    node_keys:
        Canonical public key bytes -> partition (see
        :func:`fl_clip21.flower.identity.normalise_public_key`), or None. With a
        map, every claim must come from a node whose key maps to the claimed
        partition.
    trust_claims:
        The engine made the nodes and their partition-ids (Flower's simulation
        engine): every accepted claim counts as proven.
    """

    def __init__(
        self, num_clients: int, *, node_keys: Mapping[bytes, int] | None = None, trust_claims: bool = False
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
        self.num_clients = num_clients
        self.node_keys = dict(node_keys) if node_keys is not None else None
        self.trust_claims = trust_claims
        self.client_of_node: dict[int, int] = {}  # connected, bound nodes
        self._last_node: dict[int, int] = {}  # client -> the node it was last bound to (kept when it leaves)

    def node_of(self, client: int) -> int | None:
        """The node bound to ``client`` now, or None."""
        node = self._last_node.get(client)
        return node if node is not None and self.client_of_node.get(node) == client else None

    def bound_clients(self) -> set[int]:
        return set(self.client_of_node.values())

    def claim(
        self, node: int, client: int, connected: Collection[int], public_key: bytes | None = None
    ) -> Binding:
        """Bind ``client`` to ``node`` if the claim holds (:class:`Refused` says why not).

        ``connected``: the node ids connected now (a partition whose node is
        still connected cannot be taken over). ``public_key``: the node's key
        as the SuperLink authenticated it, canonical bytes (needed with a key map).
        """
        if not 0 <= client < self.num_clients:
            raise Refused(f"node {node} claims partition {client}, outside 0..{self.num_clients - 1}")
        held = self.client_of_node.get(node)
        if held is not None and held != client:
            raise Refused(f"node {node} claims partition {client} but already holds partition {held}")
        proven_by_key = False
        if self.node_keys is not None:
            owner = self.node_keys.get(public_key) if public_key else None
            if owner is None:
                raise Refused(f"node {node} claims partition {client} but its public key is not in the key map")
            if owner != client:
                raise Refused(f"node {node} claims partition {client} but its public key is partition {owner}'s")
            proven_by_key = True
        if held == client:
            return Binding(node, client, new=False, proven=True)
        current = self.node_of(client)
        if current is not None and current in connected:
            raise Refused(f"node {node} claims partition {client}, which node {current} holds and is still connected")
        if current is not None:
            del self.client_of_node[current]
        same_node = self._last_node.get(client) == node
        self.client_of_node[node] = client
        self._last_node[client] = node
        return Binding(node, client, new=True, proven=proven_by_key or self.trust_claims or same_node)

    def bind_numbered(self, nodes: Collection[int]) -> list[Binding]:
        """Bind new ``nodes`` to free partitions in id order (apps with no partition-id handshake)."""
        free = sorted(set(range(self.num_clients)) - self.bound_clients())
        fresh = sorted(set(nodes) - set(self.client_of_node))
        return [self.claim(nid, c, connected=()) for nid, c in zip(fresh, free)]

    def forget_gone(self, connected: Collection[int]) -> list[tuple[int, int]]:
        """Unbind the nodes that are no longer connected; returns their (node, client) pairs."""
        gone = [(nid, c) for nid, c in self.client_of_node.items() if nid not in connected]
        for nid, _ in gone:
            del self.client_of_node[nid]
        return gone

    def state_dict(self) -> dict[str, Any]:
        """The last node of every client (JSON-able), for a checkpoint."""
        return {"last_node": {str(c): int(nid) for c, nid in sorted(self._last_node.items())}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: no node is connected until it claims its partition again."""
        last = state.get("last_node", {})
        if not isinstance(last, Mapping):
            raise ValueError(f"registry state 'last_node' must be a mapping, got {type(last).__name__}")
        self._last_node = {int(c): int(nid) for c, nid in last.items()}
        self.client_of_node = {}
