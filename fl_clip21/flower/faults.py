"""Client mods that misbehave on purpose, for fault-injection runs and tests."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fl_clip21.flower import records as R
from fl_clip21.flower.client import partition_of


def scale_reply_mod(factor: float, clients: Iterable[int]):
    """A mod that multiplies the train reply of ``clients`` by ``factor``.

    With a large factor it plays a client sending oversized increments
    (norm far above tau); with ``nan`` a client sending non-finite values.
    """
    targets = frozenset(clients)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if partition_of(context) not in targets or reply.has_error():
            return reply
        arrays = R.from_record(reply.content[R.ARRAYS])
        bad = {k: np.asarray(v * factor, dtype=v.dtype) for k, v in arrays.items()}
        content = RecordDict({**dict(reply.content), R.ARRAYS: R.to_record(bad)})
        return Message(content, reply_to=msg)

    return mod
