"""Client mods that misbehave on purpose, for fault-injection runs and tests.

Each mod wraps the train handler of the standard ClientApp
(``make_client_app(train_mods=[...])``) and acts only on Clip21Strategy's
messages, for the clients (partition ids) and rounds it is given.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fl_clip21.flower import records as R
from fl_clip21.flower.client import partition_of

LOST_REPLY = 9001  # error code of a reply this module threw away


def _round(msg: Message) -> int:
    config = msg.content.config_records.get(R.CONFIG)
    return int(config.get(R.ROUND, 0)) if config is not None and R.ALGORITHM in config else 0


def _targets(clients: Iterable[int] | None, rounds: Iterable[int] | None):
    cs = frozenset(clients) if clients is not None else None
    rs = frozenset(rounds) if rounds is not None else None

    def hit(msg: Message, context: Context) -> bool:
        k = _round(msg)
        return k > 0 and (cs is None or partition_of(context) in cs) and (rs is None or k in rs)

    return hit


def scale_reply_mod(factor: float, clients: Iterable[int] | None = None, rounds: Iterable[int] | None = None):
    """Multiply the reply's arrays by ``factor`` (1e6: oversized increments; nan: non-finite)."""
    hit = _targets(clients, rounds)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if not hit(msg, context) or reply.has_error() or R.ARRAYS not in reply.content:
            return reply
        arrays = R.from_record(reply.content[R.ARRAYS])
        bad = {k: np.asarray(v * factor, dtype=v.dtype) for k, v in arrays.items()}
        content = RecordDict({**dict(reply.content), R.ARRAYS: R.to_record(bad)})
        return Message(content, reply_to=msg)

    return mod


def drop_reply_mod(probability: float, seed: int = 0):
    """Lose each reply with ``probability`` after the client did its work (and kept its state).

    The server gets an error reply in its place, as when the reply never arrives.
    The draw is seeded by (seed, client, round): runs are reproducible.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        k = _round(msg)
        if k == 0:
            return reply
        rng = np.random.default_rng([seed, partition_of(context), k, 0xD12])
        if rng.random() < probability:
            return Message(error=Error(code=LOST_REPLY, reason="reply lost (fault injection)"), reply_to=msg)
        return reply

    return mod


def stale_reply_mod(clients: Iterable[int] | None = None, rounds: Iterable[int] | None = None):
    """Deliver the reply as if it were the late reply of the previous round."""
    hit = _targets(clients, rounds)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if not hit(msg, context) or reply.has_error() or R.REPLY not in reply.content:
            return reply
        metrics = reply.content[R.REPLY]
        metrics[R.ROUND] = int(metrics[R.ROUND]) - 1
        return reply

    return mod


def wipe_state_mod(clients: Iterable[int] | None = None, rounds: Iterable[int] | None = None):
    """Empty the client's state before the round, as a restarted node has it."""
    hit = _targets(clients, rounds)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if hit(msg, context):
            for key in [k for k in context.state if k.startswith(R.STATE_PREFIX)]:
                del context.state[key]
        return call_next(msg, context)

    return mod
