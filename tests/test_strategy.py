"""Clip21Strategy's configure and aggregate with mocked nodes and replies: hostile clients change nothing.

Each test: Prepare (a strategy, a fake grid whose nodes claim partitions, round 1
configured), Execute (replies built here, some of them hostile), Assert (records,
the state of the server, what is sent to whom).
"""

from __future__ import annotations

import collections
import logging
import re

import numpy as np
import pytest
from fake_grid import FakeGrid, reply_from, train_reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_clip21 import core
from fl_clip21.algorithms import make_algorithm
from fl_clip21.flower import records as R
from fl_clip21.flower import validation as V
from fl_clip21.flower.strategy import Clip21Strategy

pytestmark = pytest.mark.usefixtures("flower_task")

D = 31
TAU = 0.1
SCENARIO = {"name": "unit"}  # what the clients would build their problem from; the fake nodes ignore it


def _start(tmp_path, algorithm=None, n=3, trust=False, audit=False, claims=None):
    strategy = Clip21Strategy(
        algorithm=algorithm or make_algorithm("clip21-gd", lr=1.0, tau=TAU), scenario=SCENARIO, num_clients=n,
        copies_dir=tmp_path, trust_partition_ids=trust, audit=audit,
    )
    grid = FakeGrid(claims or {10 + i: i for i in range(n)})
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, R.to_record({"w": np.zeros(D)}), ConfigRecord({}), grid)}
    return strategy, grid, msgs


def _round(strategy, grid):
    k = strategy.round + 1
    return k, {m.metadata.dst_node_id: m for m in strategy.configure_train(k, R.to_record(strategy.params), ConfigRecord({}), grid)}


def _increment(seed):
    v = np.random.default_rng(seed).normal(size=D)
    return {"w": v * (TAU / 2 / np.linalg.norm(v))}


def _copies_mean(strategy):
    return core.mean([strategy.server_copy(i) for i in range(strategy.num_clients)])


def _run_round_1(strategy, msgs):
    replies = [train_reply(m, nid, _increment(nid), 1) for nid, m in msgs.items()]
    strategy.aggregate_train(1, replies)
    metrics = strategy.history[-1]
    assert metrics["accepted"] == 3


def test_every_partition_is_held_after_the_handshake(tmp_path):
    strategy, grid, msgs = _start(tmp_path)
    assert strategy.client_of_node == {10: 0, 11: 1, 12: 2} and sorted(msgs) == [10, 11, 12]
    assert sorted(grid.queried) == [10, 11, 12]


def test_a_node_claiming_a_connected_nodes_partition_is_refused_and_never_messaged(tmp_path, caplog):
    # Prepare: round 1 done; then a fourth node claims partition 0 while node 10 is connected.
    strategy, grid, msgs = _start(tmp_path)
    _run_round_1(strategy, msgs)
    grid.claims[99] = 0
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, msgs2 = _round(strategy, grid)
    # Assert
    assert sorted(msgs2) == [10, 11, 12] and strategy.client_of_node == {10: 0, 11: 1, 12: 2}
    assert "refused node 99: node 99 claims partition 0, which node 10 holds and is still connected" in caplog.text
    _, msgs3 = _round(strategy, grid)
    assert grid.queried.count(99) == 1  # a refused node is not asked again


def test_a_node_taking_over_without_proof_gets_a_reset_never_the_memory(tmp_path, caplog):
    # Prepare: round 1 applied every client's increment; node 10 leaves, node 99 claims partition 0.
    strategy, grid, msgs = _start(tmp_path)
    _run_round_1(strategy, msgs)
    secret = strategy.server_copy(0)
    assert core.global_norm(secret) > 0
    del grid.claims[10]
    grid.claims[99] = 0
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        k, msgs2 = _round(strategy, grid)
    # Assert: node 99 holds client 0 and is sent zeros, not client 0's memory; g lost that copy.
    assert strategy.client_of_node == {99: 0, 11: 1, 12: 2}
    sent = R.from_record(msgs2[99].content[R.RESYNC])
    assert core.global_norm(sent) == 0
    assert R.RESYNC not in msgs2[11].content
    assert core.max_abs_diff(strategy.server_state["g"], _copies_mean(strategy)) < 1e-15
    assert "took client 0 over without proving it is that client" in caplog.text
    # The node works from zero; g = mean(v_i) still holds after its increment.
    strategy.aggregate_train(k, [train_reply(m, nid, _increment(nid + k), k) for nid, m in msgs2.items()])
    assert core.max_abs_diff(strategy.server_state["g"], _copies_mean(strategy)) < 1e-15


def test_a_proven_node_taking_over_is_resynced_with_the_copy(tmp_path):
    strategy, grid, msgs = _start(tmp_path, trust=True)
    _run_round_1(strategy, msgs)
    secret = strategy.server_copy(0)
    del grid.claims[10]
    grid.claims[99] = 0
    _, msgs2 = _round(strategy, grid)
    np.testing.assert_array_equal(R.from_record(msgs2[99].content[R.RESYNC])["w"], secret["w"])


def test_a_malformed_handshake_is_a_refusal_not_an_exception(tmp_path, caplog):
    claims = {10: 0, 11: 1, 12: 2, 13: RecordDict({R.CONFIG: ConfigRecord({R.PARTITION_ID: "zero"})})}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, grid, msgs = _start(tmp_path, claims=claims)
    assert sorted(msgs) == [10, 11, 12]
    assert "refused node 13: its handshake reply is malformed: partition-id must be an integer" in caplog.text


def _state(strategy):
    return (
        {k: v.copy() for k, v in strategy.params.items()},
        {k: v.copy() for k, v in strategy.server_state["g"].items()},
        strategy.protocol.last_applied.copy(),
        set(strategy.protocol.needs_resync),
        [strategy.server_copy(i) for i in range(strategy.num_clients)],
    )


def _same(a, b):
    pa, ga, la, ra, ca = a
    pb, gb, lb, rb, cb = b
    assert core.max_abs_diff(pa, pb) == 0 and core.max_abs_diff(ga, gb) == 0
    assert (la == lb).all() and ra == rb
    assert all(core.max_abs_diff(x, y) == 0 for x, y in zip(ca, cb))


def test_a_topk_reply_with_more_than_k_entries_is_rejected_and_g_stays_the_mean(tmp_path):
    # Prepare: EF21 with Top-3 over 31 coordinates.
    algo = make_algorithm("ef21-topk", lr=1.0, topk=3)
    strategy, grid, msgs = _start(tmp_path, algorithm=algo)
    before = _state(strategy)
    # Execute: node 10 sends 5 entries, the others exactly 3.
    def sparse(idx):
        return ArrayRecord({R.SPARSE_INDICES: Array(np.asarray(idx, np.int32)),
                            R.SPARSE_VALUES: Array(np.full(len(idx), 0.01))})
    replies = []
    for nid, m in msgs.items():
        content = RecordDict({R.ARRAYS: sparse([0, 1, 2, 3, 4] if nid == 10 else [0, 1, 2]),
                              R.REPLY: MetricRecord({R.ROUND: 1, R.CLIPPED: 1})})
        replies.append(reply_from(nid, m, content))
    strategy.aggregate_train(1, replies)
    metrics = strategy.history[-1]
    # Assert
    assert metrics["rejected"] == 1 and metrics["accepted"] == 2
    assert strategy.protocol.ack(0) == 0 and before[2][0] == 0
    assert core.max_abs_diff(strategy.server_state["g"], _copies_mean(strategy)) < 1e-15


def test_bytes_up_counts_the_bytes_received_not_the_headers(tmp_path):
    strategy, grid, msgs = _start(tmp_path)
    forged = ArrayRecord({"w": Array(dtype="float64", shape=(D,), stype=V.NUMPY_STYPE, data=Array(np.zeros(1)).data)})
    replies = [reply_from(10, msgs[10], RecordDict({R.ARRAYS: forged, R.REPLY: MetricRecord({R.ROUND: 1, R.CLIPPED: 0})}))]
    replies += [train_reply(msgs[nid], nid, _increment(nid), 1) for nid in (11, 12)]
    strategy.aggregate_train(1, replies)
    metrics = strategy.history[-1]
    assert metrics["rejected"] == 1 and metrics["bytes_up"] == 8 + 2 * D * 8


def test_replies_from_nodes_not_asked_and_duplicates_are_rejected(tmp_path):
    strategy, grid, msgs = _start(tmp_path)
    good = train_reply(msgs[10], 10, _increment(1), 1)
    stranger = train_reply(msgs[10], 77, _increment(2), 1)
    strategy.aggregate_train(1, [good, good, stranger])
    metrics = strategy.history[-1]
    assert metrics["accepted"] == 1 and metrics["rejected"] == 2


# --- the property tests ---------------------------------------------------------------
#
# Node 10's reply is generated by hypothesis: garbage and well-formed shapes alike (a dense or Top-k message
# right in every respect but one value or its norm, duplicate or out-of-range indices, one entry too many,
# protocol fields of any value, app metrics of any name). Two servers run the same two rounds, one with
# that reply and one without it: a rejected reply (or a resync request) must leave the server exactly as no
# reply does, in the round and after it, and g = mean of the server's copies must hold to rounding.

K = 3  # the Top-k entries of ef21-topk here
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_numbers = st.one_of(
    st.sampled_from([0, 1, 2, -1, 1.0, 1.9, float("nan"), float("inf")]), _ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(_ints, max_size=3), st.lists(st.floats(allow_nan=True), max_size=3),
)
_metric_names = st.one_of(
    st.sampled_from([R.ROUND, R.CLIPPED, R.NEEDS_RESYNC, R.PARTITION_ID, R.UPDATE_NORM, R.INPUT_NORM,
                     "fl_clip21.accepted", "fl_clip21.rejected", "num-examples", "train_loss"]),
    st.text(max_size=10), st.text(max_size=8).map(R.PREFIX.__add__),
)
_dtypes = st.sampled_from(["float64", "float32", "int64", "int32", "<f8", ">f8", "object", "bool", "complex128", "", "f8x"])
_shapes = st.lists(st.integers(min_value=-2, max_value=40), max_size=3).map(tuple)
_FIGURES: collections.Counter = collections.Counter()  # examples, rejected, resyncs, accepted, handshakes, refused
_FAULTS: collections.Counter = collections.Counter()  # the faults the hostile replies were drawn with
_REASONS: collections.Counter = collections.Counter()  # why the hostile replies were rejected
_GAP = {"largest": 0.0, "relative": 0.0}  # max |g - mean of the server's copies| over the hostile runs


@pytest.fixture(scope="module", autouse=True)
def _print_hostile_figures():
    """``pytest tests/test_strategy.py -s -k property`` prints the figures docs/security.md quotes."""
    yield
    if _FIGURES["examples"]:
        print(f"\nhostile replies generated: {_FIGURES['examples']}; rejected: {_FIGURES['rejected']} for "
              f"{len(_REASONS)} distinct reasons; resync requests: {_FIGURES['resyncs']}; accepted: "
              f"{_FIGURES['accepted']}; largest |g - mean of the server's copies|: {_GAP['largest']:.3g} "
              f"({_GAP['relative']:.3g} of max |g|)")
        for reason, count in sorted(_REASONS.items(), key=lambda item: (-item[1], item[0])):
            print(f"  {count:4d}  {reason}")
        print(f"faults drawn: {dict(sorted(_FAULTS.items()))}")
    if _FIGURES["handshakes"]:
        print(f"hostile handshake replies generated: {_FIGURES['handshakes']}; refused: {_FIGURES['refused']}")


def _reason(text: str) -> str:
    """A rejection's reason without its values: one line per kind of fault."""
    text = re.sub(r"(?<![\w.])[-+]?\d+(\.\d+)?(e[-+]?\d+)?", "#", text.split(", got")[0])
    return text.split(": the ClientApp")[0].split(" (")[0][:90]


@st.composite
def _arrays(draw):
    """A Flower Array of any kind: raw header and bytes, any numpy array, or the model's shape scaled."""
    kind = draw(st.sampled_from(["raw", "numpy", "valid-scaled"]))
    if kind == "raw":
        return Array(dtype=draw(_dtypes), shape=draw(_shapes), stype=draw(st.sampled_from([V.NUMPY_STYPE, "torch", ""])),
                     data=draw(st.binary(max_size=400)))
    if kind == "numpy":
        shape = draw(st.lists(st.integers(0, 40), max_size=2).map(tuple))
        dtype = draw(st.sampled_from([np.float64, np.float32, np.int32, np.int64, np.complex128, np.bool_]))
        return Array(np.full(shape, draw(st.floats(-1e3, 1e3)) if dtype is not np.bool_ else True).astype(dtype))
    scale = draw(st.sampled_from([1e6, float("nan"), float("inf"), 1e308, -1e-320]))
    return Array(np.full(D, 0.01) * scale)


FAULTS = (
    "none", "value", "norm", "dense layout", "sparse indices", "sparse count", "sparse index dtype", "other kind",
    "payload", "message record", "protocol values", "protocol keys", "protocol record", "round tag",
    "resync request", "norm fields", "app metrics", "audit records", "everything",
)


def _values(draw, size: int, bound: float, fault: str) -> np.ndarray:
    """``size`` values of norm bound / 2; with ``fault`` "norm" a drawn multiple of it, "value" one NaN, inf or 1e308."""
    direction = np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=size)
    factor = 0.5
    if fault == "norm":
        factor = draw(st.sampled_from([1.0, 1 + 1e-7, 1 + 1e-5, 2.0, 1e300 / max(bound, 1.0)]))
    values = direction / np.linalg.norm(direction) * factor * bound
    if fault == "value":
        values[draw(st.integers(0, size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e308, -1e308]))
    return values


def _dense(draw, bound: float, fault: str) -> ArrayRecord:
    value = _values(draw, D, bound, fault)
    arrays = {"w": value}
    if fault == "dense layout":
        layout = draw(st.sampled_from(["float32", "shape", "extra key", "name"]))
        arrays = {"float32": {"w": value.astype(np.float32)}, "shape": {"w": np.append(value, 0.0)},
                  "extra key": {"w": value, "v": np.zeros(2)}, "name": {"W": value}}[layout]
    return R.to_record(arrays)


def _sparse(draw, bound: float, fault: str) -> ArrayRecord:
    idx = np.sort(np.random.default_rng(draw(st.integers(0, 2**16))).choice(D, K, replace=False)).astype(np.int32)
    if fault == "sparse indices":
        if draw(st.booleans()):
            idx[1] = idx[0]  # a duplicate
        else:
            idx[draw(st.integers(0, K - 1))] = draw(st.sampled_from([-1, D, D + 100, 2**31 - 1, -(2**31)]))
    if fault == "sparse count":
        idx = np.arange(draw(st.sampled_from([0, K - 1, K + 1, D])), dtype=np.int32)
    if fault == "sparse index dtype":
        idx = idx.astype(draw(st.sampled_from([np.int64, np.float64, np.uint32, np.int16])))
    return ArrayRecord({R.SPARSE_INDICES: Array(idx), R.SPARSE_VALUES: Array(_values(draw, idx.size, bound, fault))})


@st.composite
def _garbage_message(draw):
    """Anything in the message's place: Arrays of any kind under any key, another record type, or nothing."""
    kind = draw(st.sampled_from(["arrays", "arrays", "config", "none"]))
    if kind == "arrays":
        keys = draw(st.lists(st.sampled_from(["w", "v", R.SPARSE_INDICES, R.SPARSE_VALUES]), min_size=1, max_size=3,
                             unique=True))
        return ArrayRecord({k: draw(_arrays()) for k in keys})
    return ConfigRecord({"w": draw(st.binary(max_size=50))}) if kind == "config" else None


@st.composite
def _contents(draw, bound: float, sparse: bool):
    """A train reply that is right in every respect but one drawn fault (or wrong in every respect: "everything")."""
    fault = draw(st.sampled_from(FAULTS))
    everything = fault == "everything"
    protocol: dict = {R.ROUND: 1, R.CLIPPED: draw(st.sampled_from([0, 1]))}
    if fault in ("protocol values", "everything"):
        keys = [R.ROUND, R.CLIPPED, R.NEEDS_RESYNC, R.UPDATE_NORM, R.INPUT_NORM]
        for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
            protocol[key] = draw(_numbers)
    if fault == "protocol keys":
        protocol.pop(draw(st.sampled_from([R.ROUND, R.CLIPPED, None])), None)
        protocol.update(draw(st.dictionaries(_metric_names, _numbers, max_size=3)))
    if fault == "round tag":
        protocol[R.ROUND] = draw(st.sampled_from([0, 2, -1, 2**63 - 1, 1.0, 1.9, float("nan")]))
    if fault == "resync request":
        protocol[R.NEEDS_RESYNC] = draw(st.sampled_from([1, 1, 0]))
    if fault == "norm fields":
        for key in draw(st.lists(st.sampled_from([R.UPDATE_NORM, R.INPUT_NORM]), min_size=1, max_size=2, unique=True)):
            protocol[key] = draw(st.sampled_from([0.0, 1.5, 7, -1.0, float("nan"), float("inf"), [1.0]]))
    content = RecordDict({})
    record_kind = draw(st.sampled_from([MetricRecord, ConfigRecord, None])) if fault == "protocol record" else MetricRecord
    if record_kind is not None:
        content[R.REPLY] = record_kind(protocol)
    if everything or fault in ("payload", "message record"):
        message = draw(_garbage_message())
    elif (fault == "other kind") != sparse:
        message = _sparse(draw, bound, fault)
    else:
        message = _dense(draw, bound, fault)
    if message is not None:
        content[R.ARRAYS] = message
    if everything or fault == "app metrics":
        for name in draw(st.lists(st.sampled_from([R.METRICS, "train", R.PREFIX + "x"]), max_size=2, unique=True)):
            content[name] = MetricRecord(draw(st.dictionaries(_metric_names, _numbers, max_size=4)))
    if everything or fault == "audit records":
        for key in draw(st.lists(st.sampled_from([R.AUDIT_START, R.AUDIT_END]), min_size=1, max_size=2, unique=True)):
            content[key] = ArrayRecord({"w": draw(_arrays())})
    _FAULTS[fault] += 1
    return content


class _Log(logging.Handler):
    """The messages logged at WARNING and above while attached to Flower's logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _honest(name, messages, k, nodes=(11, 12)):
    if name == "clip21-gd":
        return [train_reply(messages[nid], nid, _increment(nid + 10 * k), k) for nid in nodes]
    return [reply_from(nid, messages[nid], RecordDict({
        R.ARRAYS: R.encode_sparse({"w": 0.01 * np.eye(D)[nid + k]}, K), R.REPLY: MetricRecord({R.ROUND: k, R.CLIPPED: 1})}))
        for nid in nodes]


def _gap(strategy) -> float:
    gap = core.max_abs_diff(strategy.server_state["g"], _copies_mean(strategy))
    scale = max(1.0, float(max(np.abs(v).max() for v in strategy.server_state["g"].values())))
    _GAP["largest"] = max(_GAP["largest"], gap)
    _GAP["relative"] = max(_GAP["relative"], gap / scale)
    return gap / scale


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["clip21-gd", "ef21-topk"]), audit=st.booleans(), data=st.data())
def test_any_reply_content_is_never_an_exception_and_a_rejected_reply_changes_nothing(tmp_path, name, audit, data):
    # Prepare: two identical servers after round 1's configure; nodes 11 and 12 reply as clients do.
    algorithm = {"clip21-gd": lambda: make_algorithm(name, lr=1.0, tau=TAU), "ef21-topk": lambda: make_algorithm(name, lr=1.0, topk=K)}
    hostile, grid, msgs = _start(tmp_path, algorithm=algorithm[name](), audit=audit)
    quiet, quiet_grid, quiet_msgs = _start(tmp_path, algorithm=algorithm[name](), audit=audit)
    content = data.draw(_contents(hostile._bound, name == "ef21-topk"), label="node 10's reply")
    log = _Log()
    logging.getLogger("flwr").addHandler(log)
    # Execute: node 10's reply is hostile; nothing raises. Then a round in which every node is honest.
    try:
        hostile.aggregate_train(1, [reply_from(10, msgs[10], content), *_honest(name, msgs, 1)])
    finally:
        logging.getLogger("flwr").removeHandler(log)
    quiet.aggregate_train(1, _honest(name, quiet_msgs, 1))
    record = hostile.history[-1]
    # Assert: the reply is accepted, rejected (logged with node and client) or a resync request, nothing else.
    _FIGURES["examples"] += 1
    assert record["accepted"] + record["rejected"] + record["resyncs"] == 3 and record["failed"] == 0
    assert quiet.history[-1]["accepted"] == 2
    if record["rejected"]:
        _FIGURES["rejected"] += 1
        prefix = "round 1: rejected the reply of node 10 (client 0): "
        (line,) = [line for line in log.lines if line.startswith(prefix)]
        _REASONS[_reason(line.removeprefix(prefix))] += 1
    _FIGURES["resyncs"] += record["resyncs"]
    _FIGURES["accepted"] += record["accepted"] == 3
    if record["accepted"] == 2:  # a reply not applied leaves the server as no reply does
        _same(_state(hostile), _state(quiet))
    assert _gap(hostile) <= 1e-15
    for strategy, strategy_grid in ((hostile, grid), (quiet, quiet_grid)):
        k, round_msgs = _round(strategy, strategy_grid)
        strategy.aggregate_train(k, _honest(name, round_msgs, k, nodes=(10, 11, 12)))
        assert strategy.history[-1]["accepted"] == 3
    if record["accepted"] == 2:  # and after it: client 0 was resynced to the same copy in both
        _same(_state(hostile), _state(quiet))
    assert _gap(hostile) <= 1e-15


_config_values = st.one_of(
    st.sampled_from([0, 1, 2, 3, -1, 2**63 - 1, 1.0, True]), _ints, st.floats(allow_nan=True), st.booleans(),
    st.text(max_size=5), st.binary(max_size=5), st.lists(_ints, max_size=2),
)


@st.composite
def _handshake_contents(draw):
    fields = draw(st.dictionaries(st.sampled_from([R.PARTITION_ID, R.NUM_PARTITIONS, "other"]), _config_values, max_size=3))
    kind = draw(st.sampled_from(["config", "config", "metric", "elsewhere", "empty"]))
    if kind == "metric":
        numeric = {k: v for k, v in fields.items() if type(v) in (int, float)}
        return RecordDict({R.CONFIG: MetricRecord(numeric)})
    if kind == "elsewhere":
        return RecordDict({"other": ConfigRecord(fields)})
    return RecordDict({R.CONFIG: ConfigRecord(fields)}) if kind == "config" else RecordDict({})


@settings(max_examples=300)
@given(content=_handshake_contents())
def test_any_handshake_reply_is_a_partition_in_range_or_a_refusal(content):
    from fl_clip21.flower.nodes import NodeSync

    # Prepare: node 10's handshake reply is generated; nodes 11 and 12 claim partitions 1 and 2.
    nodes, grid = NodeSync(num_clients=3, handshake=True, trust_partition_ids=False), FakeGrid({10: content, 11: 1, 12: 2})
    # Execute: the decoder alone, then a sync of the three nodes; nothing raises.
    try:
        claim = V.decode_handshake(content, 3)
        assert type(claim) is int and 0 <= claim < 3
    except V.ReplyError:
        claim = None
    nodes.sync(grid)
    # Assert: node 10 holds the partition it claimed, or is refused; a partition has one node.
    _FIGURES["handshakes"] += 1
    _FIGURES["refused"] += 10 in nodes.refused
    held = nodes.registry.client_of_node
    assert (10 in nodes.refused) == (claim is None) and held.get(10) == claim  # node 10 is asked first
    assert len(set(held.values())) == len(held) and set(held.values()) <= {0, 1, 2}


def test_an_ef21_topk_reply_of_1e308_is_rejected_and_g_stays_finite_and_the_mean(tmp_path, caplog):
    # Before: ef21-topk had no message bound, and one client's 1e308 overflowed g.
    # Prepare: node 10 sends a well-formed Top-3 message, exactly 3 distinct indices in range, one value 1e308.
    strategy, grid, msgs = _start(tmp_path, algorithm=make_algorithm("ef21-topk", lr=1.0, topk=K))
    forged = ArrayRecord({R.SPARSE_INDICES: Array(np.array([0, 5, 30], np.int32)),
                          R.SPARSE_VALUES: Array(np.array([0.01, 1e308, 0.01]))})
    hostile = reply_from(10, msgs[10], RecordDict({R.ARRAYS: forged, R.REPLY: MetricRecord({R.ROUND: 1, R.CLIPPED: 1})}))
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.aggregate_train(1, [hostile, *_honest("ef21-topk", msgs, 1)])
    # Assert
    record = strategy.history[-1]
    assert record["rejected"] == 1 and record["accepted"] == 2
    assert all(np.isfinite(v).all() for v in strategy.server_state["g"].values())
    assert all(np.isfinite(v).all() for v in strategy.params.values())
    assert core.max_abs_diff(strategy.server_state["g"], _copies_mean(strategy)) < 1e-15
    assert "rejected the reply of node 10 (client 0): norm 1e+308 exceeds the bound 1e+06" in caplog.text


def test_a_rejection_is_logged_with_its_round_node_client_and_reason(tmp_path, caplog):
    strategy, grid, msgs = _start(tmp_path, claims={10: 2, 11: 0, 12: 1})
    stale = train_reply(msgs[10], 10, _increment(10), 0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.aggregate_train(1, [stale, *(train_reply(msgs[n], n, _increment(n), 1) for n in (11, 12))])
    assert strategy.history[-1]["rejected"] == 1
    assert "round 1: rejected the reply of node 10 (client 2): reply is for round 0, this is round 1" in caplog.text


# --- misconfiguration, the app's metrics, norms ----------------------------------------


def test_replies_without_clip21_mod_stop_the_run_naming_the_mod(tmp_path):
    # Before: every reply was rejected as "for round -1", the model never changed and the run exited 0.
    from fl_clip21.flower.strategy import ClientSetupError

    strategy, grid, msgs = _start(tmp_path)
    plain = [reply_from(nid, m, RecordDict({R.ARRAYS: R.to_record({"w": np.zeros(D)}),
                                            "metrics": MetricRecord({"train_loss": 0.3, "num-examples": 10})}))
             for nid, m in msgs.items()]
    with pytest.raises(ClientSetupError, match=r"round 1: every reply failed .*clip21_mod"):
        strategy.aggregate_train(1, plain)


def test_the_same_client_app_error_from_every_node_stops_the_run(tmp_path):
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    from fl_clip21.flower.strategy import ClientSetupError

    strategy, grid, msgs = _start(tmp_path)
    errors = []
    for nid, m in msgs.items():
        reply = Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ConfigError: no data"), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = nid
        errors.append(reply)
    with pytest.raises(ClientSetupError, match="ConfigError: no data"):
        strategy.aggregate_train(1, errors)
    # Lost replies (any other error) are a fault the protocol repairs, not a reason to stop.
    strategy2, _, msgs2 = _start(tmp_path)
    lost = []
    for nid, m in msgs2.items():
        reply = Message(error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = nid
        lost.append(reply)
    strategy2.aggregate_train(1, lost)
    assert strategy2.history[-1]["failed"] == 3


def _error_replies(msgs, code, reason_of):
    from flwr.app import Error, Message

    replies = []
    for nid, m in msgs.items():
        reply = Message(error=Error(code=code, reason=reason_of(nid)), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = nid
        replies.append(reply)
    return replies


def test_a_client_app_error_that_differs_only_in_a_path_or_number_stops_the_run(tmp_path):
    # Before: the run stopped only when every node's error text was the same string.
    from flwr.common.constant import ErrorCode

    from fl_clip21.flower.strategy import ClientSetupError

    # Prepare: every node fails to read its own data file (a path with its node id in it).
    strategy, grid, msgs = _start(tmp_path)
    def missing(nid):
        return (f"<class 'flwr.clientapp.client_app.ClientAppException'>:<'Exception ConfigError occurred. Message: "
                f"data file '/srv/node-{nid}/part{nid % 10}.csv' not found (node {nid})'>")
    # Execute, Assert: one set-up error, named with the first node's own text.
    with pytest.raises(ClientSetupError, match=r"round 1: every reply failed .*'/srv/node-10/part0.csv' not found"):
        strategy.aggregate_train(1, _error_replies(msgs, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, missing))
    # Errors that differ in what they say do not stop the run, nor do the same words with another code.
    strategy2, _, msgs2 = _start(tmp_path)
    words = {10: "ConfigError: no data", 11: "ConfigError: no data", 12: "MemoryError: cannot allocate"}
    strategy2.aggregate_train(1, _error_replies(msgs2, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, words.get))
    assert strategy2.history[-1]["failed"] == 3
    strategy3, _, msgs3 = _start(tmp_path)
    codes = iter([ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                  ErrorCode.CLIENT_APP_RAISED_EXCEPTION])
    replies = [r for nid in msgs3 for r in _error_replies({nid: msgs3[nid]}, next(codes), missing)]
    strategy3.aggregate_train(1, replies)
    assert strategy3.history[-1]["failed"] == 3


def test_setup_reason_keeps_what_no_later_round_changes():
    from flwr.common.constant import ErrorCode

    from fl_clip21.flower.strategy import setup_reason

    a = setup_reason(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "no file /data/a/x.csv on node 1234, port 9092")
    b = setup_reason(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "no file C:\\data\\b.csv on node 77, port 9093")
    assert a[0] == b[0] and a[1].startswith("no file /data/a/x.csv")
    assert setup_reason(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "KeyError: 'lr'")[0] != \
        setup_reason(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "KeyError: 'tau'")[0]
    assert setup_reason(ErrorCode.NODE_UNAVAILABLE, "gone") is None  # a lost reply: a later round may get one
    assert setup_reason(ErrorCode.MESSAGE_UNAVAILABLE, "/x/1") is None


def test_the_apps_train_metrics_are_averaged_as_fedavg_does_beside_fl_clip21s_own(tmp_path):
    strategy, grid, msgs = _start(tmp_path)

    def with_metrics(loss, examples):
        def extra(content):
            content[R.METRICS] = MetricRecord({"train_loss": loss, "num-examples": examples})
        return extra

    replies = [train_reply(msgs[10], 10, _increment(10), 1, extra=with_metrics(1.0, 10)),
               train_reply(msgs[11], 11, _increment(11), 1, extra=with_metrics(0.0, 30)),
               train_reply(msgs[12], 12, _increment(12), 1, extra=with_metrics(float("nan"), 60))]
    _, returned = strategy.aggregate_train(1, replies)
    record = strategy.history[-1]
    assert record["accepted"] == 3
    # Weighted by num-examples; the NaN of node 12 is left out of the average, not of the round.
    assert record["train_metrics"]["train_loss"] == pytest.approx(10 / 40)
    assert returned["train_loss"] == pytest.approx(0.25) and returned["fl_clip21.accepted"] == 3
    assert "accepted" not in returned and "num-examples" not in returned


def test_an_apps_metric_may_have_any_name_but_never_overwrites_the_servers_own(tmp_path, caplog):
    # Before: an app key 'fl_clip21.accepted' replaced the server's own count in the round's MetricRecord,
    # and app metrics named 'clipped' or 'server-round' were dropped (the protocol used those names).
    # Prepare: every node's app reports clipped, server-round and fl_clip21.accepted=99, in a record named "train".
    strategy, grid, msgs = _start(tmp_path)

    def app(value):
        def extra(content):
            content["train"] = MetricRecord({"clipped": value, "server-round": 7 * value, "fl_clip21.accepted": 99})
        return extra

    replies = [train_reply(msgs[nid], nid, _increment(nid), 1, extra=app(float(j))) for j, nid in enumerate(sorted(msgs))]
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, returned = strategy.aggregate_train(1, replies)
    # Assert
    assert returned["clipped"] == pytest.approx(1.0) and returned["server-round"] == pytest.approx(7.0)
    assert returned["fl_clip21.accepted"] == 3 and strategy.history[-1]["train_metrics"].keys() == {"clipped", "server-round"}
    assert ("round 1: node 10 (client 0): left out of the app's metrics: keys ['fl_clip21.accepted'] "
            "(the prefix 'fl_clip21.' is the server's)") in caplog.text


def test_a_reply_with_several_app_metric_records_is_used_without_its_metrics(tmp_path, caplog):
    strategy, grid, msgs = _start(tmp_path)

    def two(content):
        content["a"] = MetricRecord({"loss": 1.0})
        content["b"] = MetricRecord({"loss": 2.0})

    replies = [train_reply(msgs[10], 10, _increment(10), 1, extra=two)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, returned = strategy.aggregate_train(1, replies)
    assert strategy.history[-1]["accepted"] == 1 and "loss" not in returned
    assert "left out of the app's metrics: 2 MetricRecords ['a', 'b'], expected one" in caplog.text


def test_each_round_reports_quantiles_of_the_norms_tau_is_chosen_from(tmp_path):
    strategy, grid, msgs = _start(tmp_path)

    def norms(update, diff):
        def extra(content):
            content[R.REPLY][R.UPDATE_NORM] = update
            content[R.REPLY][R.INPUT_NORM] = diff
        return extra

    replies = [train_reply(msgs[nid], nid, _increment(nid), 1, extra=norms(float(j + 1), 0.5 * (j + 1)))
               for j, nid in enumerate(sorted(msgs))]
    strategy.aggregate_train(1, replies)
    record = strategy.history[-1]
    assert record["update_norm_q50"] == 2.0 and record["update_norm_max"] == 3.0
    assert record["input_norm_q10"] == pytest.approx(0.6) and record["input_norm_max"] == 1.5
    bad = train_reply(msgs[10], 10, _increment(10), 1, extra=norms(-1.0, 0.5))
    with pytest.raises(V.ReplyError, match="must be a finite number >= 0, got -1.0"):
        V.decode_train_reply(bad.content, strategy.params, TAU)


def test_num_clients_may_be_left_out_then_the_nodes_connected_are_the_clients(tmp_path):
    from fl_clip21.flower.mod import clip21_mod  # noqa: F401 - the apps this mode is for

    strategy = Clip21Strategy(algorithm=make_algorithm("clip21-gd", lr=1.0, tau=TAU), scenario=None,
                              num_clients=None, min_available_nodes=2, copies_dir=tmp_path)
    grid = FakeGrid({10: 0, 11: 0, 12: 0})  # an app without the handshake: nodes are numbered
    msgs = list(strategy.configure_train(1, R.to_record({"w": np.zeros(D)}), ConfigRecord({}), grid))
    assert strategy.num_clients == 3 and len(msgs) == 3
    with pytest.raises(ValueError, match="num_clients may be left out only without a scenario"):
        Clip21Strategy(algorithm=make_algorithm("clip21-gd", lr=1.0, tau=TAU), scenario=SCENARIO, num_clients=None)
