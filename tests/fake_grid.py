"""A Grid stand-in for unit tests of Clip21Strategy's parts: nodes answer handshakes, replies are built by the test."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module

from fl_clip21.flower import records as R


def reply_from(node: int, to: Message, content: RecordDict) -> Message:
    """``content`` as node ``node``'s reply to ``to`` (the engine sets the source on delivery)."""
    reply = Message(content, reply_to=to)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


class FakeGrid:
    """Nodes ``claims`` (node id -> the handshake reply content it gives, a partition-id, or an Error)."""

    def __init__(self, claims: dict[int, int | RecordDict | Error], keys: dict[int, bytes] | None = None) -> None:
        self.claims = dict(claims)
        self.keys = keys or {}
        self.queried: list[int] = []
        self._next_id = 0

    def get_node_ids(self) -> list[int]:
        return list(self.claims)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.claims]

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.queried.append(node)
            claim = self.claims[node]
            if isinstance(claim, Error):
                reply = Message(error=claim, reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = node
                out.append(reply)
                continue
            content = claim if isinstance(claim, RecordDict) else RecordDict(
                {R.CONFIG: ConfigRecord({R.PARTITION_ID: claim, R.NUM_PARTITIONS: -1})}
            )
            out.append(reply_from(node, msg, content))
        return out

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return []


def train_reply(msg: Message, node: int, message: dict[str, np.ndarray], server_round: int,
                clipped: int = 0, extra: Callable[[RecordDict], None] | None = None) -> Message:
    """What a well-behaved Clip21 client replies to train message ``msg``."""
    content = RecordDict({R.ARRAYS: R.to_record(message),
                          R.REPLY: MetricRecord({R.ROUND: server_round, R.CLIPPED: clipped})})
    if extra is not None:
        extra(content)
    return reply_from(node, msg, content)
