"""The server side of the consistency protocol that keeps g = mean(v_i) through faults.

README, "Keeping g = mean(v_i) through faults". Per client the server keeps
the last round whose increment it applied (the ``ack`` it sends), the number of
rounds the client was asked (for epsilon), and its copy of the client's memory
(the sum of the increments it applied), in a :class:`~fl_clip21.copies.MemoryCopies`
file. A client whose increment was not applied, or that lost its state, gets
the copy with its next message (a *resync*): the rule of
:func:`fl_clip21.fault_protocol.resync_due`, which the batched engines apply to
their rows of copies (:func:`~fl_clip21.fault_protocol.settle_rows`).

A client whose partition was taken over by a node that could not prove it is
that client (:mod:`fl_clip21.flower.registry`) is *reset* instead: the server
takes the client's copy out of g and its copy becomes zero, which the node is
then resynced to. g = mean(v_i) still holds and the node learns nothing of
the memory of the client it claims to be. A reset writes nothing to the copies
file: the client is marked ``zeroed`` until its next increment is applied, so
the slot the last checkpoint refers to is never touched.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from fl_clip21 import core
from fl_clip21.copies import MemoryCopies
from fl_clip21.fault_protocol import resync_due
from fl_clip21.core import Params


class ProtocolState:
    """Acks, times asked, and the server's copies of ``num_clients`` client memories.

    ``copies`` is None for algorithms whose clients keep no memory the server
    mirrors (GD, Clip-GD...): then only ``times_asked`` is kept. ``layout`` is
    the model (names, shapes, dtypes of a memory), needed with ``copies``.
    """

    def __init__(
        self, num_clients: int, copies: MemoryCopies | None = None, layout: Mapping[str, np.ndarray] | None = None
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
        self.num_clients = num_clients
        self.copies = copies
        self.times_asked = np.zeros(num_clients, dtype=np.int64)  # rounds each client was asked
        self.last_applied = np.zeros(num_clients, dtype=np.int64)  # round of its last increment applied (ack)
        self.needs_resync: set[int] = set()
        self.zeroed: set[int] = set()  # reset: the copy is zero, whatever the file holds
        if copies is not None and layout is None:
            raise ValueError("a ProtocolState with copies needs the model's layout")
        self._layout = {k: (np.shape(v), np.asarray(v).dtype) for k, v in (layout or {}).items()}

    def _copies(self) -> MemoryCopies:
        if self.copies is None:
            raise RuntimeError("this algorithm keeps no client memories: there is no copy to read or change")
        return self.copies

    def ack(self, client: int) -> int:
        """The last round whose increment of ``client`` the server applied."""
        return int(self.last_applied[client])

    def has_history(self, client: int) -> bool:
        """Whether the server's copy of ``client``'s memory may be non-zero."""
        return self.last_applied[client] > 0 and client not in self.zeroed

    def copy(self, client: int) -> Params:
        """The server's copy of ``client``'s memory (new arrays)."""
        copies = self._copies()
        if client in self.zeroed:
            return {k: np.zeros(shape, dtype) for k, (shape, dtype) in self._layout.items()}
        return copies.get(client, self.ack(client))

    def apply(self, client: int, increment: Mapping[str, np.ndarray], server_round: int) -> None:
        """Add ``client``'s increment of ``server_round`` to its copy; the ack becomes that round."""
        copies = self._copies()
        if client in self.zeroed:
            copies.put(client, increment, server_round, keep=self.ack(client))
            self.zeroed.discard(client)
        else:
            copies.add(client, increment, self.ack(client), server_round)
        self.last_applied[client] = server_round

    def reset(self, client: int) -> Params:
        """Make ``client``'s copy zero and resync it to that; returns the copy it had (to take out of g)."""
        old = self.copy(client)
        self.zeroed.add(client)
        self.needs_resync.add(client)
        return old

    def end_round(self, asked: Collection[int], applied: Collection[int]) -> None:
        """A client asked whose increment was not applied may hold it in its memory: resync it next time."""
        self.needs_resync = resync_due(asked, applied, pending=self.needs_resync)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the copies themselves (they are in their file), JSON-able."""
        return {
            "times_asked": self.times_asked.tolist(),
            "last_applied": self.last_applied.tolist(),
            "zeroed": sorted(self.zeroed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; every client with a memory is resynced on its next round.

        A client may hold increments of rounds the checkpoint never saw, or
        have lost its state with the old run.
        """
        n = self.num_clients
        times = np.asarray(state["times_asked"], dtype=np.int64)
        last = np.asarray(state["last_applied"], dtype=np.int64)
        zeroed = {int(c) for c in state.get("zeroed", [])}
        if times.shape != (n,) or last.shape != (n,):
            raise ValueError(
                f"protocol state has {times.shape} times_asked and {last.shape} last_applied, expected ({n},)"
            )
        if (times < 0).any() or (last < 0).any() or not zeroed <= set(range(n)):
            raise ValueError("protocol state has negative counts or clients outside 0..n-1")
        self.times_asked, self.last_applied, self.zeroed = times, last, zeroed
        self.needs_resync = set(range(n)) if self.copies is not None else set()


class Audit:
    """The memories the clients last reported (audit runs only): ``g`` against their mean."""

    def __init__(self, memories: dict[int, Params]) -> None:
        self.memories = memories
        self.memory_gap = 0.0  # this round: largest |v_i - server's copy| over the memories clients started from

    def started(self, client: int, memory: Params, server_copy: Params) -> None:
        """``client`` says it started the round from ``memory``; the server's copy was ``server_copy``."""
        self.memory_gap = max(self.memory_gap, core.max_abs_diff(memory, server_copy))
        self.memories[client] = memory  # what it holds until it is resynced, if its reply is not applied

    def ended(self, client: int, memory: Params) -> None:
        self.memories[client] = memory

    def invariant_gap(self, g: Params) -> float:
        """max |g - (1/n) sum_i v_i| over the memories the clients last reported."""
        return core.max_abs_diff(g, core.mean(list(self.memories.values())))

    def take_round(self) -> float:
        """This round's memory gap; the next round starts from 0."""
        gap, self.memory_gap = self.memory_gap, 0.0
        return gap
