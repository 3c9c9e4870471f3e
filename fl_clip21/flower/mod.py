"""``clip21_mod``: turn any Flower ClientApp into a Clip21 client.

Add it to the train handler of an existing ClientApp and use
:class:`~fl_clip21.flower.strategy.Clip21Strategy` on the server (with no
scenario: ``Clip21Strategy(algorithm=make_algorithm("clip21-gd", lr=1.0, tau=...),
scenario=None, num_clients=...)``).

Sign convention. The wrapped handler returns either

- updated model arrays y (``fl_clip21.update = "arrays"``, the default, as any
  Flower training app does): the pseudo-gradient is ``x - y``, the received model
  minus the returned one, so a server step ``x <- x - lr * g`` with ``lr = 1`` and
  no clipping is FedAvg's model average;
- gradients (``fl_clip21.update = "gradients"`` in the train config): used as they are.

The mod keeps the client's memory v_i in ``context.state`` (with the round tag of
the consistency protocol, as in :mod:`fl_clip21.flower.client`), and replies with
only ``c_i = clip_tau(pseudo_gradient - v_i)`` under the same array keys. A
message without the keys it needs gets Flower's ``MOD_FAILED_PRECONDITION``
error reply. A train message from another strategy (Flower's FedAvg, say) gets
that error reply too, naming Clip21Strategy, and the node logs the reason once
per run: passing the message through would train without clipping while the app
believes it clips, so FedAvg's rounds get 0 results and keep the initial model.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from fl_clip21 import core
from fl_clip21.flower import records as R
from fl_clip21.flower.client import commit_memory, enter_session, load_state, sync_memory
from fl_clip21.layout import Layout

MODE = "fl_clip21.update"
STATE = "clip21_mod"
MEMORY = "v"
WARNED = "clip21_mod.warned"  # context.state record: this node has logged NOT_CLIP21 in this run
NOT_CLIP21 = (
    "clip21_mod: the ServerApp's strategy is not Clip21Strategy (its train messages carry no "
    f"{R.SESSION!r}); every train message gets this error reply, nothing is trained: use "
    "fl_clip21.flower.strategy.Clip21Strategy in the ServerApp, or remove clip21_mod from the ClientApp"
)


def _error(msg: Message, reason: str) -> Message:
    return Message(error=Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _from_clip21_strategy(msg: Message) -> bool:
    """Whether a Clip21Strategy sent ``msg``: it tags every train config with its session id."""
    return any(R.SESSION in record for record in msg.content.config_records.values())


def _warn_once(context: Context, reason: str) -> None:
    """Log ``reason`` the first time this node meets it in this run.

    The mark lives in ``context.state``, which Flower keeps per node and run
    (across Ray actors in a simulation, across ClientApp processes in a deployment).
    """
    if WARNED in context.state:
        return
    context.state[WARNED] = ConfigRecord({"reason": reason})
    log(WARNING, "node %d: %s (shown once per node and run)", context.node_id, reason)


def _config(msg: Message) -> ConfigRecord | None:
    for record in msg.content.config_records.values():
        if R.TAU in record:
            return record
    return None


def clip21_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip21 on the client: send ``clip_tau(pseudo_gradient - v_i)`` and keep v_i."""
    if not msg.metadata.message_type.startswith(MessageType.TRAIN):
        return call_next(msg, context)
    if not _from_clip21_strategy(msg):
        _warn_once(context, NOT_CLIP21)
        return _error(msg, NOT_CLIP21)
    config = _config(msg)
    if config is None or R.ROUND not in config or len(msg.content.array_records) != 1:
        return _error(
            msg,
            f"clip21_mod needs one ArrayRecord and a ConfigRecord with {R.TAU!r}, {R.ROUND!r} and {R.ACK!r}: "
            "give Clip21Strategy algorithm=make_algorithm('clip21-gd', ...) and scenario=None",
        )
    tau, server_round, ack = float(config[R.TAU]), int(config[R.ROUND]), int(config.get(R.ACK, 0))
    mode = str(config.get(MODE, "arrays"))
    if mode not in ("arrays", "gradients"):
        return _error(msg, f"{MODE} must be 'arrays' or 'gradients', got {mode!r}")
    x = R.from_record(next(iter(msg.content.array_records.values())))
    layout = Layout.of(x)
    scope = enter_session(context, config, STATE)

    if sync_memory(context, scope, MEMORY, msg, ack, layout):
        metrics = MetricRecord({R.NEEDS_RESYNC: 1, R.ROUND: server_round})
        return Message(RecordDict({R.REPLY: metrics}), reply_to=msg)

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if len(reply.content.array_records) != 1:
        return _error(msg, f"clip21_mod needs the train handler to reply with one ArrayRecord, got {len(reply.content.array_records)}")
    out_name, out = next(iter(reply.content.array_records.items()))
    y = R.from_record(out)
    if set(y) != set(x) or any(y[k].shape != x[k].shape for k in x):
        return _error(msg, "clip21_mod needs the reply's arrays to have the keys and shapes of the received ones")
    target = layout.flatten(y) if mode == "gradients" else layout.flatten(x) - layout.flatten(y)
    v = load_state(context, scope, [MEMORY], layout.size, layout.dtype)[MEMORY]
    start = layout.unflatten(v[0])
    step = core.ef_step_rows(target[None, :], v, core.clip_rows(tau))
    commit_memory(context, scope, MEMORY, step.memory[0], server_round)

    del reply.content.array_records[out_name]
    reply.content[R.ARRAYS] = R.to_record(layout.unflatten(step.increment[0]))
    # The protocol's fields in a record of their own: the app's metrics stay as the app wrote them.
    reply.content[R.REPLY] = MetricRecord({
        R.CLIPPED: int(step.active[0]), R.ROUND: server_round,
        R.UPDATE_NORM: float(core.row_norms(target)), R.INPUT_NORM: float(step.input_norms[0]),
    })
    if bool(config.get(R.DO_AUDIT, False)):
        reply.content[R.AUDIT_START] = R.to_record(start)
        reply.content[R.AUDIT_END] = R.to_record(layout.unflatten(step.memory[0]))
    return reply
