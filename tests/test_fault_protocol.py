"""The fault protocol and the per-round record, written once (fl_clip21.fault_protocol), the same on every engine.

docs/algorithms.md, "Keeping g = mean(v_i) through faults" and "The per-round record". The
property tests hold the batched engines' rows (:func:`settle_rows`) and the Flower strategy's
file of copies (:class:`~fl_clip21.flower.protocol.ProtocolState`) to one trajectory of copies
and memories under any pattern of lost replies; the last test runs the Flower strategy with the
real Flower client function in this process (no Ray) against :func:`~fl_clip21.engine.run_local`
with stragglers, offline clients and partial participation, and compares every field of every
record.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from fake_grid import FakeGrid, reply_from
from flwr.app import ConfigRecord, Context, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_clip21 import backend
from fl_clip21.algorithms import algorithm_from_config, make_algorithm
from fl_clip21.config import resolve
from fl_clip21.copies import MemoryCopies
from fl_clip21.engine import evaluate, late_rows, run_local
from fl_clip21.fault_protocol import (
    NORM_QUANTILES, batch_record, message_bytes, new_copies, norm_quantiles, norm_quantiles_by_group, resync_due,
    round_record, settle_rows,
)
from fl_clip21.flower import records as R
from fl_clip21.flower.client import train
from fl_clip21.flower.protocol import ProtocolState
from fl_clip21.flower.strategy import Clip21Strategy
from fl_clip21.problems import build_problem

D = 3
# A round: which of n clients are asked, and which of those have their increment applied.
_ROUND = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=4, max_size=4)


def test_resync_due_is_every_client_asked_or_pending_whose_increment_was_not_applied():
    assert resync_due(asked=[0, 1, 2], applied=[1]) == {0, 2}
    assert resync_due(asked=[3], applied=[3], pending=[5, 3]) == {5}  # 3 applied again: in step
    assert resync_due(asked=[], applied=[], pending=[4]) == {4}  # not asked: still due


@settings(max_examples=60, deadline=None)
@given(rounds=st.lists(_ROUND, min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_rows_and_the_strategys_copies_follow_one_protocol_through_any_lost_replies(rounds, seed):
    # Prepare: 4 clients whose memory moves by their increment (Clip21: v_i += c_i), g by the applied ones / n.
    n = 4
    rng = np.random.default_rng(seed)
    memory, copies, g = np.zeros((n, D)), np.zeros((n, D)), np.zeros(D)
    with tempfile.TemporaryDirectory() as folder:
        protocol = ProtocolState(n, MemoryCopies(f"{folder}/c", {"v": np.zeros(D)}, n), layout={"v": np.zeros(D)})
        flower_memory = {i: np.zeros(D) for i in range(n)}
        last: dict[int, bool] = {}  # client -> whether its increment was applied the last round it was asked
        for k, pattern in enumerate(rounds, start=1):
            asked = np.array([i for i, (a, _) in enumerate(pattern) if a], dtype=np.int64)
            applied = np.array([pattern[i][1] for i in asked], dtype=bool)
            increments = rng.normal(size=(len(asked), D))
            # Execute: the batched engine's rows ...
            memory[asked] += increments
            g += settle_rows(memory, copies, asked, increments, applied).sum(axis=0) / n
            # ... and the strategy's protocol, one client at a time, resyncing lazily at the next message.
            for j, c in enumerate(asked.tolist()):
                if c in protocol.needs_resync:
                    flower_memory[c] = protocol.copy(c)["v"].copy()
                flower_memory[c] = flower_memory[c] + increments[j]
                if applied[j]:
                    protocol.apply(c, {"v": increments[j]}, k)
            protocol.end_round(asked.tolist(), asked[applied].tolist())
            # Assert: g = mean(v_i); every copy is the same; every memory is its copy (the Flower client's once resynced)
            np.testing.assert_allclose(g, memory.mean(axis=0), rtol=0, atol=1e-12)
            np.testing.assert_array_equal(memory, copies)
            for c in range(n):
                np.testing.assert_allclose(protocol.copy(c)["v"], copies[c], rtol=0, atol=1e-12)
                if c not in protocol.needs_resync:
                    np.testing.assert_allclose(flower_memory[c], memory[c], rtol=0, atol=1e-12)
            last.update(zip(asked.tolist(), applied.tolist()))
            assert protocol.needs_resync == {c for c, ok in last.items() if not ok}  # last asked, not applied
        protocol.copies.close()


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_settle_rows_applies_on_every_backend_and_refuses_a_drop_without_copies(device):
    if device == "cpu":
        pytest.importorskip("torch")
    xp = backend.get(device)
    algorithm = make_algorithm("clip21-gd", lr=1.0, tau=0.1)
    memory = xp.asarray(np.arange(12.0).reshape(4, 3))
    copies = new_copies(algorithm, 4, 3, np.float64, xp, drops=True)
    rows, applied = np.array([1, 3]), np.array([True, False])
    kept = settle_rows(memory, copies, rows, xp.asarray(np.ones((2, 3))), applied)
    np.testing.assert_array_equal(xp.to_numpy(kept), np.ones((1, 3)))
    np.testing.assert_array_equal(xp.to_numpy(copies)[[1, 3]], [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(xp.to_numpy(memory)[3], [0, 0, 0])  # resynced to its copy
    np.testing.assert_array_equal(xp.to_numpy(memory)[1], [3, 4, 5])  # the engine wrote it; settling keeps it
    assert new_copies(algorithm, 4, 3, np.float64, xp, drops=False) is None
    assert new_copies(make_algorithm("gd", lr=1.0), 4, 3, np.float64, xp, drops=True) is None
    with pytest.raises(ValueError, match="1 of 2 increments were not applied and there are no copies"):
        settle_rows(memory, None, rows, xp.asarray(np.ones((2, 3))), applied)


_COUNTS = st.integers(0, 50)


@settings(max_examples=80, deadline=None)
@given(accepted=_COUNTS, rejected=_COUNTS, failed=_COUNTS, resyncs=_COUNTS, data=st.data())
def test_round_record_fields_are_defined_once(accepted, rejected, failed, resyncs, data):
    clipped = data.draw(st.integers(0, accepted))
    norms = data.draw(st.lists(st.tuples(st.floats(0, 1e300), st.floats(0, 1e300)), min_size=accepted,
                               max_size=accepted))
    algorithm = make_algorithm("clip21-gd", lr=1.0, tau=0.1)
    rec = round_record(
        7, algorithm, participants=accepted + rejected + failed + resyncs, accepted=accepted, clipped=clipped,
        rejected=rejected, failed=failed, resyncs=resyncs, bytes_up=3, seconds=0.5,
        times_asked=np.ones(2, dtype=np.int64), delta=1e-5, norms=norms,
    )
    assert rec["clip_fraction"] == (clipped / accepted if accepted else 0.0) and 0 <= rec["clip_fraction"] <= 1
    assert {k: rec[k] for k in ("round", "bytes_up", "seconds")} == {"round": 7, "bytes_up": 3, "seconds": 0.5}
    assert {k: v for k, v in rec.items() if "_norm_" in k} == norm_quantiles(norms)
    assert "epsilon" not in rec


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1e300), st.floats(0, 1e300)), min_size=1, max_size=40),
    st.integers(1, 4),
)
def test_norm_quantiles_are_numpys_linear_percentiles(norms, groups):
    """The record's quantiles equal np.percentile's (default method) bit for bit, alone and by group."""
    table = np.asarray(norms)
    expected = np.percentile(table, [q for _, q in NORM_QUANTILES], axis=0)
    got = norm_quantiles(table)
    assert [got[f"update_norm_{s}"] for s, _ in NORM_QUANTILES] == expected[:, 0].tolist()
    assert [got[f"input_norm_{s}"] for s, _ in NORM_QUANTILES] == expected[:, 1].tolist()
    rows = np.concatenate([table] * groups)  # equal groups: the one-call path
    for q in norm_quantiles_by_group(rows, np.repeat(np.arange(groups), len(table)), groups):
        assert q == got


def test_batch_record_is_round_record_of_the_rows_that_came_in():
    algorithm = make_algorithm("clip21-topk", lr=1.0, tau=0.1, topk=2)
    applied = np.array([True, False, True, True])
    active = np.array([True, True, False, True])
    norms = np.arange(8.0).reshape(4, 2)
    times = np.array([3, 1])
    got = batch_record(5, algorithm, applied=applied, active=active, norms=norms, d=10, dtype=np.float32,
                       seconds=0.25, times_asked=times, delta=1e-5)
    assert got == round_record(
        5, algorithm, participants=4, accepted=3, clipped=2, failed=1, bytes_up=3 * 2 * (4 + 4), seconds=0.25,
        times_asked=times, delta=1e-5, norms=norms[applied],
    )
    assert message_bytes(algorithm, 10, np.float32) == 2 * (4 + 4)  # Top-k: k int32 indices and k values
    noisy = make_algorithm("clip-sgd", lr=1.0, tau=0.1, sigma=0.5)
    rec = batch_record(5, noisy, applied=applied, active=active, norms=norms, d=10, dtype=np.float64,
                       seconds=0.0, times_asked=times, delta=1e-5)
    assert rec["epsilon"] > 0 and not any("_norm_" in k for k in rec)  # noise: epsilon, and no norms told


class _InProcessGrid(FakeGrid):
    """Nodes 100 + i holding client i: the handshake from :class:`FakeGrid`, train messages to the real client."""

    def __init__(self, n: int) -> None:
        super().__init__({100 + i: i for i in range(n)})
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={R.PARTITION_ID: i, R.NUM_PARTITIONS: n},
                             state=RecordDict(), run_config={})
            for i in range(n)
        }

    def train(self, messages, cfg, k):
        """The replies to ``messages`` that come in time: a late client works (and keeps its state), its reply is lost."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = train(msg, self.contexts[node])
            if not late_rows(cfg, k, np.array([node - 100]))[0]:
                replies.append(reply_from(node, msg, reply.content))
        return replies


# Stragglers (some late every round, 0.01 s late: the client really sleeps), offline clients, half sampled.
FAULTS = {
    "num-clients": 6, "rounds": 8, "seed": 3, "lr": 1.0, "tau": 0.1, "fraction": 0.5, "availability": 0.8,
    "straggler-fraction": 0.4, "straggler-delay": 0.01, "round-timeout": 0.005, "beta1": 0.5, "topk": 2,
    "batch-size": 16, "audit": True, "problem": {"name": "logreg"}, "partition": {"kind": "dirichlet", "alpha": 1.0},
}


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("name", ["clip21-gd", "clip21-sgd2m", "clip21-topk", "ef21-topk"])
def test_the_strategy_and_the_batched_engine_give_the_same_records_through_lost_replies(tmp_path, name):
    # Prepare
    cfg = resolve({**FAULTS, "algorithms": [name]})
    problem = build_problem(cfg)
    strategy = Clip21Strategy(
        algorithm=algorithm_from_config(name, cfg), scenario=cfg,
        num_clients=cfg["num-clients"], fraction=cfg["fraction"], availability=cfg["availability"],
        seed=cfg["seed"], audit=True, delta=cfg["delta"], copies_dir=tmp_path,
        evaluate=lambda params: evaluate(problem, params), fraction_evaluate=0.0,
    )
    grid = _InProcessGrid(cfg["num-clients"])
    arrays = R.to_record(problem.init_params())
    # Execute: the Flower strategy with the Flower client, round after round; the batched engine
    for k in range(1, cfg["rounds"] + 1):
        messages = list(strategy.configure_train(k, arrays, ConfigRecord({}), grid))
        arrays, _ = strategy.aggregate_train(k, grid.train(messages, cfg, k))
    batched = run_local(cfg, name)
    # Assert: replies were lost and clients resynced; then every field of every record agrees but the time taken
    assert sum(r["failed"] for r in strategy.history) >= 4
    assert all(r["invariant_gap"] < 1e-12 and r["memory_gap"] < 1e-12 for r in strategy.history)
    assert len(strategy.history) == len(batched["records"]) == cfg["rounds"]
    for flower, vec in zip(strategy.history, batched["records"]):
        assert set(flower) - {"invariant_gap", "memory_gap"} == set(vec)
        for key in set(vec) - {"seconds"}:
            assert flower[key] == pytest.approx(vec[key], rel=1e-9, abs=1e-14), (key, vec["round"])
    for key, value in batched["params"].items():
        np.testing.assert_allclose(strategy.params[key], value, rtol=0, atol=1e-12)
