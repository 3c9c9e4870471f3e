"""Flower ClientApp handlers: run an :class:`~fl_clip21.algorithms.Algorithm` on a node.

The client's private state (Clip21's v_i) lives in ``context.state`` and only
the algorithm's message (the clipped increment c_i) goes back to the server.

Consistency protocol (README, "Keeping g = mean(v_i) through faults"): the
memory the server mirrors (``algorithm.memory``) is not committed when the
client replies. The new value is kept as *pending*, tagged with its round; the
server's next message to this client says the last round whose increment it
applied (``ack``). Pending equal to ``ack`` is committed, any other is
dropped. A client whose state is gone while the server has applied its
increments asks for a resync; a resync message carries the server's copy of
this client's memory, which replaces the client's.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_clip21.algorithms import algorithm_from_config
from fl_clip21.config import DATA_DIR, with_data_dir
from fl_clip21.engine import client_round
from fl_clip21.flower import records as R
from fl_clip21.problems import build_problem

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
PENDING = "pending."
PENDING_ROUND = "pending-round"


def partition_of(context: Context) -> int:
    """This node's client index i (its ``partition-id`` node config)."""
    try:
        return int(context.node_config[PARTITION_ID])
    except KeyError:
        raise ValueError(
            f"node_config has no {PARTITION_ID!r}: start the SuperNode with "
            f"--node-config \"{PARTITION_ID}=I {NUM_PARTITIONS}=N\""
        ) from None


def enter_session(context: Context, config, name: str) -> str:
    """The state scope of run ``config[SESSION]`` and ``name``; drops other runs' state.

    Every strategy instance (one algorithm of one run) has its own session id,
    kept in its checkpoint, so a node serving several runs one after the other
    never starts one from another's memory.
    """
    session = str(config.get(R.SESSION, ""))
    keep = f"{R.STATE_PREFIX}{session}."
    for key in [k for k in context.state if k.startswith(R.STATE_PREFIX) and not k.startswith(keep)]:
        del context.state[key]
    return f"{session}.{name}"


def state_key(algorithm: str, name: str) -> str:
    """Record name of state ``name`` (e.g. ``v``) of ``algorithm`` in ``context.state``."""
    return f"{R.STATE_PREFIX}{algorithm}.{name}"


def load_state(context: Context, algorithm: str, init: dict) -> dict:
    """The client state saved by :func:`save_state`, or ``init`` on a first round."""
    out = {}
    for name, value in init.items():
        key = state_key(algorithm, name)
        out[name] = R.from_record(context.state[key]) if key in context.state else value
    return out


def save_state(context: Context, algorithm: str, state: dict) -> None:
    for name, params in state.items():
        context.state[state_key(algorithm, name)] = R.to_record(params)


def resolve_pending(context: Context, algorithm: str, memory: str, ack: int) -> bool:
    """Commit the pending memory if the server applied it (round == ack), else drop it.

    Returns whether this client holds its memory (committed or just resolved).
    """
    pending_key, round_key = state_key(algorithm, PENDING + memory), state_key(algorithm, PENDING_ROUND)
    if round_key in context.state:
        if int(context.state[round_key]["round"]) == ack:
            context.state[state_key(algorithm, memory)] = context.state[pending_key]
        del context.state[pending_key]
        del context.state[round_key]
    return state_key(algorithm, memory) in context.state


def sync_memory(context: Context, scope: str, memory: str, msg: Message, ack: int) -> bool:
    """Bring the client's memory in line with the server's; True if a resync is needed.

    A resync record in ``msg`` replaces the memory (and is taken out of the
    message); otherwise the pending memory is committed or dropped by ``ack``.
    """
    resync = msg.content.array_records.get(R.RESYNC)
    if resync is not None:
        resolve_pending(context, scope, memory, -1)  # drop any pending
        context.state[state_key(scope, memory)] = resync
        del msg.content.array_records[R.RESYNC]
        return False
    # Not holding the memory while the server has applied increments of ours: ask for it.
    return not resolve_pending(context, scope, memory, ack) and ack > 0


def train(msg: Message, context: Context) -> Message:
    """One client round of the algorithm named in the message's config.

    A message from one of Flower's own strategies (no algorithm named) gets
    plain local training, for the ``flower-dp-fixed`` baseline.
    """
    from fl_clip21.flower import dp_baseline

    if dp_baseline.is_flower_message(msg):
        return dp_baseline.local_training(msg, context)
    config = msg.content[R.CONFIG]
    cfg = with_data_dir(json.loads(str(config[R.SCENARIO])), context.node_config.get(DATA_DIR))
    server_round = int(config[R.ROUND])
    algorithm = algorithm_from_config(str(config[R.ALGORITHM]), cfg)
    problem = build_problem(cfg)
    i = partition_of(context)
    params = R.from_record(msg.content[R.ARRAYS])
    mem = algorithm.memory
    scope = enter_session(context, config, algorithm.name)
    if mem is not None and sync_memory(context, scope, mem, msg, int(config.get(R.ACK, 0))):
        metrics = MetricRecord({R.NEEDS_RESYNC: 1, PARTITION_ID: i, R.ROUND: server_round})
        return Message(RecordDict({R.METRICS: metrics}), reply_to=msg)
    state = load_state(context, scope, algorithm.client_init(params))
    result = client_round(algorithm, problem, cfg, i, server_round, params, state)
    committed = {k: v for k, v in result.state.items() if k != mem}
    save_state(context, scope, committed)
    if mem is not None:
        context.state[state_key(scope, PENDING + mem)] = R.to_record(result.state[mem])
        context.state[state_key(scope, PENDING_ROUND)] = ConfigRecord({"round": server_round})
    content = RecordDict(
        {
            R.ARRAYS: (R.encode_sparse if algorithm.sparse else R.to_record)(result.message),
            R.METRICS: MetricRecord({"clipped": int(result.clipped), PARTITION_ID: i, R.ROUND: server_round}),
        }
    )
    if bool(config.get(R.DO_AUDIT, False)) and mem is not None:
        # The memory as it stands if the server applies this reply, and if it does not.
        content[R.AUDIT_APPLIED] = R.to_record(result.state[mem])
        content[R.AUDIT_DROPPED] = R.to_record(state[mem])
    return Message(content, reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Handshake: tell the server which client index this node holds."""
    i = partition_of(context)
    n = int(context.node_config.get(NUM_PARTITIONS, -1))
    return Message(
        RecordDict({R.CONFIG: ConfigRecord({PARTITION_ID: i, NUM_PARTITIONS: n})}), reply_to=msg
    )


def make_client_app(train_mods: list | None = None) -> ClientApp:
    """The ClientApp every engine and deployment uses (``train_mods`` wrap its train handler).

    Flower's ``fixedclipping_mod`` wraps the train handler for Flower's own
    DP strategy's messages (the ``flower-dp-fixed`` baseline) and only those.
    """
    from fl_clip21.flower.dp_baseline import flower_dp_mod

    app = ClientApp()
    app.train(mods=[*(train_mods or []), flower_dp_mod])(train)
    app.query()(query)
    return app
