"""Flower ClientApp handlers: run an :class:`~fl_clip21.algorithms.Algorithm` on a node.

The client's private state (Clip21's v_i) lives in ``context.state`` and only
the algorithm's message (the clipped increment c_i) goes back to the server.

Consistency protocol (README, "Keeping g = mean(v_i) through faults"): the
client commits its new memory (``algorithm.memory``) when it replies and tags
it with the round. The server's next message to this client says the last
round whose increment it applied (``ack``); when the server did not apply one
(a lost, late, rejected or duplicated reply) it sends its own copy of this
client's memory with that message (``resync``), which replaces the client's.
A client whose tag differs from ``ack`` with no resync in the message (its
state was lost, or it is stale) holds a memory the server does not: it asks
for a resync instead of working. The client keeps one copy of its memory.
"""

from __future__ import annotations

import functools
import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_clip21.algorithms import Algorithm, ClientRound, algorithm_from_config
from fl_clip21.config import DATA_DIR, PLUGIN_MODULES, with_node_config
from fl_clip21.engine import client_round, straggler_delay
from fl_clip21.fault_protocol import reports_norms
from fl_clip21.flower import records as R
from fl_clip21.layout import Layout
from fl_clip21.problems import Problem, build_problem

PARTITION_ID = R.PARTITION_ID
NUM_PARTITIONS = R.NUM_PARTITIONS
MEMORY_ROUND = "fl_clip21.memory-round"  # in the memory's state record: the round of its last increment


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


VECTOR = "data"  # the key of a flat state vector's raw bytes in its ConfigRecord


def load_state(context: Context, scope: str, names, d: int, dtype) -> dict[str, np.ndarray]:
    """The client state saved by :func:`save_state`, as (1, d) rows; zeros on a first round."""
    out = {}
    for name in names:
        record = R.get_record(context.state, state_key(scope, name), ConfigRecord)
        if record is None:
            out[name] = np.zeros((1, d), dtype=dtype)
        else:
            out[name] = R.unpack(record, {VECTOR: np.zeros(d, dtype=dtype)})[VECTOR].reshape(1, d).copy()
    return out


def save_state(context: Context, scope: str, state: dict, **extra: int) -> None:
    """Keep ``state`` (name -> a flat vector, or a (1, d) row) in ``context.state`` as raw bytes."""
    for name, vector in state.items():
        context.state[state_key(scope, name)] = R.pack({VECTOR: np.ravel(vector)}, **extra)


def memory_round(context: Context, scope: str, memory: str) -> int:
    """The round of the last increment in the client's memory (0: no memory)."""
    record = R.get_record(context.state, state_key(scope, memory), ConfigRecord)
    return int(record[MEMORY_ROUND]) if record is not None else 0


def commit_memory(context: Context, scope: str, memory: str, value: np.ndarray, server_round: int) -> None:
    """Keep the flat vector ``value`` as the client's memory, holding the increments up to ``server_round``."""
    save_state(context, scope, {memory: value}, **{MEMORY_ROUND: server_round})


def sync_memory(context: Context, scope: str, memory: str, msg: Message, ack: int, layout: Layout) -> bool:
    """Bring the client's memory in line with the server's; True if a resync is needed.

    A resync record in ``msg`` (the model's arrays) replaces the memory (and is
    taken out of the message). Otherwise the memory must hold exactly the
    increments up to ``ack``, the last round the server applied one of this client's.
    """
    resync = R.get_record(msg.content, R.RESYNC, ArrayRecord)
    if resync is not None:
        commit_memory(context, scope, memory, layout.flatten(R.from_record(resync)), ack)
        del msg.content[R.RESYNC]
        return False
    return memory_round(context, scope, memory) != ack


@functools.lru_cache(maxsize=4)
def run_setup(scenario: str, name: str, data_dir=None, plugin_modules=None) -> tuple[dict, Algorithm, Problem]:
    """(scenario, algorithm, problem) of a train message's scenario JSON and algorithm name.

    ``data_dir`` and ``plugin_modules`` are the node's ``data-dir`` and ``plugin-modules``
    (:func:`~fl_clip21.config.with_node_config`).
    Every message of a run carries the same scenario: a process serving many
    clients (a Ray actor) parses it and builds the algorithm once. The
    scenario dict is shared: read it, never change it.
    """
    cfg = with_node_config(json.loads(scenario), {DATA_DIR: data_dir, PLUGIN_MODULES: plugin_modules})
    return cfg, algorithm_from_config(name, cfg), build_problem(cfg)


def _reply_metrics(algorithm: Algorithm, out: ClientRound, client: int, server_round: int) -> dict:
    metrics = {R.CLIPPED: int(out.active[0]), PARTITION_ID: client, R.ROUND: server_round}
    if reports_norms(algorithm):
        metrics[R.UPDATE_NORM], metrics[R.INPUT_NORM] = (float(v) for v in out.norms[0])
    return metrics


def train(msg: Message, context: Context) -> Message:
    """One client round of the algorithm named in the message's config (a batch of one client).

    A message from one of Flower's own strategies (no algorithm named) gets
    plain local training, for Flower's DP baselines (``flower-dp-*``).
    """
    from fl_clip21.flower import dp_baseline

    if dp_baseline.is_flower_message(msg):
        return dp_baseline.local_training(msg, context)
    config = msg.content[R.CONFIG]
    cfg, algorithm, problem = run_setup(
        str(config[R.SCENARIO]), str(config[R.ALGORITHM]),
        context.node_config.get(DATA_DIR), context.node_config.get(PLUGIN_MODULES),
    )
    server_round = int(config[R.ROUND])
    i = partition_of(context)
    delay = straggler_delay(cfg, i, server_round)
    if delay:
        time.sleep(delay)  # a slow device: the server may drop the reply (round-timeout)
    layout = problem.layout
    x = layout.flatten(R.from_record(msg.content[R.ARRAYS]))
    mem = algorithm.memory
    scope = enter_session(context, config, algorithm.name)
    if mem is not None and sync_memory(context, scope, mem, msg, int(config.get(R.ACK, 0)), layout):
        metrics = MetricRecord({R.NEEDS_RESYNC: 1, PARTITION_ID: i, R.ROUND: server_round})
        return Message(RecordDict({R.REPLY: metrics}), reply_to=msg)
    state = load_state(context, scope, algorithm.client_state, layout.size, layout.dtype)
    audit = bool(config.get(R.DO_AUDIT, False)) and mem is not None
    # The memory this round starts from (the round writes the new one into the same array).
    start = R.to_record(layout.unflatten(state[mem][0])) if audit else None
    out = client_round(algorithm, problem, cfg, i, server_round, x, state)
    save_state(context, scope, {k: v for k, v in out.state.items() if k != mem})
    if mem is not None:
        commit_memory(context, scope, mem, out.state[mem], server_round)
    increment = layout.unflatten(out.messages[0])
    if algorithm.sparse:
        message = R.encode_sparse(increment, algorithm.sparse_entries(layout.size))
    else:
        message = R.to_record(increment)
    content = RecordDict(
        {
            R.ARRAYS: message,
            R.REPLY: MetricRecord(_reply_metrics(algorithm, out, i, server_round)),
        }
    )
    if audit:
        content[R.AUDIT_START] = start
        content[R.AUDIT_END] = R.to_record(layout.unflatten(out.state[mem][0]))
    return Message(content, reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Handshake: tell the server which client index this node holds (and build the scenario's problem)."""
    config = R.get_record(msg.content, R.CONFIG, ConfigRecord)
    if config is not None and R.SCENARIO in config:
        build_problem(with_node_config(json.loads(str(config[R.SCENARIO])), context.node_config))
    i = partition_of(context)
    n = int(context.node_config.get(NUM_PARTITIONS, -1))
    return Message(
        RecordDict({R.CONFIG: ConfigRecord({PARTITION_ID: i, NUM_PARTITIONS: n})}), reply_to=msg
    )


def make_client_app(train_mods: list | None = None) -> ClientApp:
    """The ClientApp every engine and deployment uses (``train_mods`` wrap its train handler).

    Flower's ``fixedclipping_mod`` wraps the train handler for Flower's own
    client-side DP strategy's messages (the ``flower-dp-client-fixed`` baseline) and only those.
    """
    from fl_clip21.flower.dp_baseline import flower_dp_mod

    app = ClientApp()
    app.train(mods=[*(train_mods or []), flower_dp_mod])(train)
    app.query()(query)
    return app
