"""Clip21Strategy's configure and aggregate with mocked nodes and replies: hostile clients change nothing.

Each test: Prepare (a strategy, a fake grid whose nodes claim partitions, round 1
configured), Execute (replies built here, some of them hostile), Assert (records,
the state of the server, what is sent to whom).
"""

from __future__ import annotations

import collections
import logging

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
_SHAPES: collections.Counter = collections.Counter()  # reasons the property test's hostile replies got


@pytest.fixture(scope="module", autouse=True)
def _print_hostile_shapes():
    """``pytest tests/test_strategy.py -s`` prints the figures the closing note quotes."""
    yield
    if _SHAPES:
        print(f"\nhostile replies generated: {sum(_SHAPES.values())}, rejected for {len(_SHAPES)} distinct reasons; "
              f"most common: {_SHAPES.most_common(5)}")


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


# --- the property test ---------------------------------------------------------------

_numbers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
)
_dtypes = st.sampled_from(["float64", "float32", "int64", "int32", "<f8", ">f8", "object", "bool", "complex128", "", "f8x"])
_shapes = st.lists(st.integers(min_value=-2, max_value=40), max_size=3).map(tuple)


@st.composite
def _arrays(draw):
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


@st.composite
def _contents(draw):
    metrics = {R.ROUND: 1, "clipped": 0}
    if draw(st.sampled_from(range(3))) == 1:
        for key in draw(st.lists(st.sampled_from([R.ROUND, "clipped", R.NEEDS_RESYNC, "other"]), max_size=3)):
            metrics[key] = draw(_numbers)
    if draw(st.sampled_from(range(10))) == 7:
        metrics.pop(draw(st.sampled_from([R.ROUND, "clipped"])))
    content = RecordDict({R.METRICS: MetricRecord(metrics)})
    arrays_kind = draw(st.sampled_from(["hostile", "hostile", "none", "config", "valid"]))
    if arrays_kind == "hostile":
        keys = draw(st.lists(st.sampled_from(["w", "v", R.SPARSE_INDICES, R.SPARSE_VALUES]), min_size=1, max_size=3, unique=True))
        content[R.ARRAYS] = ArrayRecord({k: draw(_arrays()) for k in keys})
    elif arrays_kind == "config":
        content[R.ARRAYS] = ConfigRecord({"w": draw(st.binary(max_size=50))})
    elif arrays_kind == "valid":
        content[R.ARRAYS] = R.to_record({"w": np.full(D, 0.001)})
    for key in draw(st.lists(st.sampled_from([R.AUDIT_START, R.AUDIT_END]), max_size=2, unique=True)):
        content[key] = ArrayRecord({"w": draw(_arrays())})
    if draw(st.sampled_from(range(20))) == 7:
        content[R.METRICS] = ConfigRecord({R.ROUND: 1})
    return content


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=_contents(), audit=st.booleans(), name=st.sampled_from(["clip21-gd", "ef21-topk"]))
def test_any_reply_content_is_never_an_exception_and_a_rejected_reply_changes_nothing(tmp_path, content, audit, name):
    # Prepare: two identical servers after round 1's configure; nodes 11 and 12 reply as clients do.
    hyper = {"tau": TAU} if name == "clip21-gd" else {"topk": 3}
    hostile, _, msgs = _start(tmp_path, algorithm=make_algorithm(name, lr=1.0, **hyper), audit=audit)
    quiet, _, quiet_msgs = _start(tmp_path, algorithm=make_algorithm(name, lr=1.0, **hyper), audit=audit)

    def honest(messages):
        if name == "clip21-gd":
            return [train_reply(messages[nid], nid, _increment(nid), 1) for nid in (11, 12)]
        return [reply_from(nid, messages[nid], RecordDict({
            R.ARRAYS: R.encode_sparse({"w": np.eye(D)[nid]}, 3), R.REPLY: MetricRecord({R.ROUND: 1, R.CLIPPED: 1})}))
            for nid in (11, 12)]

    # Execute: node 10's reply is hostile; nothing raises
    hostile.aggregate_train(1, [reply_from(10, msgs[10], content), *honest(msgs)])
    quiet.aggregate_train(1, honest(quiet_msgs))
    metrics = hostile.history[-1]
    # Assert: a hostile reply that was not accepted left the server exactly as no reply does.
    assert quiet.history[-1]["accepted"] == 2
    if metrics["accepted"] == 2:
        _same(_state(hostile), _state(quiet))
        try:
            V.decode_train_reply(content, hostile.params, hostile._bound, hostile._sparse_k, audit)
            _SHAPES["resync request" if metrics["resyncs"] else "accepted by decoding"] += 1
        except V.ReplyError as e:
            _SHAPES[str(e).split(",")[0][:48]] += 1
    assert core.max_abs_diff(hostile.server_state["g"], _copies_mean(hostile)) < 1e-15


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
