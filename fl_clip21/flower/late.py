"""Replies that missed their round, and why a node must not be messaged before they come.

A reply later than the round's timeout is dropped like a lost one. The node
may still be working on it, and Flower's simulation engine would then run the
node's next message at the same time, from the same ``context.state``, and
keep whichever state is written back last (``vce_api.worker``: no per-node
lock). So a node is sent its next message only once its late reply has come in
(or ``wait`` seconds have passed), and that reply is thrown away.

A deployed SuperNode that was killed and started again with its key comes back
with its old node id (SuperNode authentication), but its late reply died with
the old process: a node whose activation time changed since the message was
sent is not waited for.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log

from fl_clip21.flower import stop


class LateReplies:
    """The messages of a round whose replies did not come in time, per node."""

    def __init__(self, wait: float) -> None:
        if not wait >= 0:
            raise ValueError(f"late_reply_wait must be >= 0 seconds, got {wait!r}")
        self.wait = wait
        self.sent: list[Message] = []  # this round's messages (their ids are set when pushed)
        self.pending: dict[int, str] = {}  # node -> id of a message whose reply missed its round
        self.activated: dict[int, str] = {}  # node -> when it was last activated, as the message was pending

    def sending(self, messages: list[Message]) -> list[Message]:
        """Remember ``messages`` as this round's; returns them."""
        self.sent = messages
        return messages

    def destinations(self) -> dict[str, int]:
        """Message id -> destination node of this round's pushed messages."""
        return {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent if m.metadata.message_id}

    def round_over(self, answered: set[str], grid: Grid | None = None) -> None:
        """The round is over; ``answered`` are the ids of the messages that got a reply."""
        late = [m for m in self.sent if m.metadata.message_id and m.metadata.message_id not in answered]
        for msg in late:
            self.pending[msg.metadata.dst_node_id] = msg.metadata.message_id
        self.sent = []
        if late and grid is not None:
            self.activated.update(_activations(grid, {m.metadata.dst_node_id for m in late}))

    def await_nodes(self, grid: Grid, nodes: Iterable[int] | None = None) -> None:
        """Wait until the late replies of ``nodes`` (default: all) came in, and drop them."""
        wanted = set(self.pending) if nodes is None else set(nodes)
        waiting = {nid: mid for nid, mid in self.pending.items() if nid in wanted}
        if not waiting:
            return
        now = _activations(grid, waiting)
        for nid in [n for n in waiting if n in self.activated and now.get(n, self.activated[n]) != self.activated[n]]:
            log(WARNING, "node %d was started again: its late reply to message %s is gone", nid, waiting[nid])
            del self.pending[nid], waiting[nid]
        if not waiting:
            return
        deadline = time.monotonic() + self.wait
        ids = set(waiting.values())
        while ids and time.monotonic() < deadline:
            for reply in grid.pull_messages(ids):
                ids.discard(reply.metadata.reply_to_message_id)
            if ids:
                stop.wait(0.02)
        for nid, mid in waiting.items():
            del self.pending[nid]
            self.activated.pop(nid, None)
            if mid in ids:
                log(WARNING, "node %d: no reply to message %s within %.0f s; messaging it again", nid, mid, self.wait)


def _activations(grid: Grid, nodes) -> dict[int, str]:
    """When each of ``nodes`` was last activated, for grids that say (deployment; the simulation's never restart)."""
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return {}
    wanted = set(nodes)
    return {info.node_id: info.last_activated_at for info in get_nodes() if info.node_id in wanted}
