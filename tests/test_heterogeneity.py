"""System heterogeneity: offline clients, stragglers with a round timeout, uneven data sizes.

The Flower runs are real simulations on Ray, all three scenarios in one
simulation (one Ray start); each is checked against the vectorized engine.
Their settings keep the Flower runs deterministic on a loaded machine: as many
Ray actors as clients (a sleeping straggler never holds up another client), and
a straggler's delay (4.5 s) and an on-time reply (about 0.1 s) are seconds away
from the round timeout (3 s).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fl_clip21.algorithms import make_algorithm
from fl_clip21.config import ConfigError, resolve
from fl_clip21.engine import (
    late_rows,
    online_clients,
    run_local,
    run_vectorized,
    sample_clients,
    straggler_delay,
)
from fl_clip21.flower import records as R
from fl_clip21.flower.client import make_client_app, partition_of
from fl_clip21.problems import build_problem, client_sizes

N = 8
ACTORS = 4  # Ray actors: fewer than the clients (the handshake warms each), more than the stragglers of a round
_COMMON = {
    "num-clients": N, "num-cpus": (os.cpu_count() or 1) / ACTORS, "lr": 1.0, "tau": 0.1, "problem": {"name": "logreg"},
}
# seed 4: 4, 3, 6, 3, 6 and 0 clients online in rounds 1-6 (fraction 0.5 asks for 4).
AVAILABILITY = {
    **_COMMON, "name": "availability", "seed": 4, "rounds": 6, "availability": 0.4, "fraction": 0.5,
    "algorithms": ["clip21-sgd2m", "clip-gd"], "sigma": 0.05, "beta1": 0.5, "beta2": 0.8,
    "partition": {"kind": "dirichlet", "alpha": 1.0},
}
# Label-sorted blocks of 2, 11, 25, ... 182 rows; batch-size 16 exceeds the two smallest.
SIZES = {
    **_COMMON, "name": "sizes", "seed": 0, "rounds": 4, "algorithms": ["clip21-sgd", "sgd", "clip21-gd"],
    "batch-size": 16, "partition": {"kind": "label-sorted", "sizes": "square"},
}
# seed 22: clients 4 and 6 are slow in round 1, client 6 in round 4 (the last).
STRAGGLERS = {
    **_COMMON, "name": "stragglers", "seed": 22, "rounds": 4, "audit": True, "algorithms": ["clip21-gd", "clip21-sgd2m"],
    "beta1": 0.5, "straggler-fraction": 0.15, "straggler-delay": 4.5, "round-timeout": 3.0,
    "partition": {"kind": "label-sorted"},
}
SCENARIOS = {"availability": AVAILABILITY, "sizes": SIZES, "stragglers": STRAGGLERS}
# Every field of a record is compared but the time a round took (and the audit, which only Flower runs).
NOT_COMPARED = {"seconds", "invariant_gap", "memory_gap"}
GAP = 1e-12


def _trained_mod(folder: Path):
    """A train mod that leaves a file ``SCENARIO.ALGORITHM.ROUND.CLIENT`` for every message it serves."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = msg.content.config_records.get(R.CONFIG)
        if config is not None and R.ALGORITHM in config:
            name = json.loads(str(config[R.SCENARIO]))["name"]
            (folder / f"{name}.{config[R.ALGORITHM]}.{int(config[R.ROUND])}.{partition_of(context)}").touch()
        return call_next(msg, context)

    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fl_clip21.flower.simulation import simulate

    folder = tmp_path_factory.mktemp("trained")
    cfgs = [resolve(s) for s in SCENARIOS.values()]
    flower = simulate(cfgs, client_app=make_client_app(train_mods=[_trained_mod(folder)]))
    out = {}
    for key, cfg, fl in zip(SCENARIOS, cfgs, flower):
        out[key] = (cfg, fl, run_vectorized(cfg))
    return out, folder


def _assert_same_trajectory(flower: dict, vectorized: dict) -> None:
    for key, arr in flower["params"].items():
        np.testing.assert_allclose(vectorized["params"][key], arr, rtol=0, atol=1e-10)
    assert len(flower["records"]) == len(vectorized["records"])
    for fr, vr in zip(flower["records"], vectorized["records"]):
        assert set(fr) - {"invariant_gap", "memory_gap"} == set(vr), (fr, vr)
        for key in set(vr) - NOT_COMPARED:
            assert vr[key] == pytest.approx(fr[key], rel=1e-9, abs=1e-14), (key, vr["round"], fr, vr)


@pytest.mark.parametrize(
    "scenario, name", [(s, a) for s, sc in SCENARIOS.items() for a in sc["algorithms"]]
)
def test_both_engines_give_the_same_trajectory(runs, scenario, name):
    cfg, flower, vectorized = runs[0][scenario]
    _assert_same_trajectory(flower[name], vectorized[name])


# --- availability ------------------------------------------------------------------


def test_flower_trains_exactly_the_sampled_online_clients(runs):
    (res, folder) = runs
    cfg, flower, _ = res["availability"]
    for name in cfg["algorithms"]:
        records = flower[name]["records"]
        for k in range(1, cfg["rounds"] + 1):
            sampled = sample_clients(cfg["seed"], k, N, cfg["fraction"], cfg["availability"])
            online = online_clients(cfg["seed"], k, N, cfg["availability"])
            trained = sorted(int(f.name.split(".")[-1]) for f in folder.glob(f"availability.{name}.{k}.*"))
            assert trained == sampled, (name, k)
            assert set(sampled) <= set(online)
            assert len(sampled) == min(4, len(online))
            assert records[k - 1]["participants"] == len(sampled)
    # The scenario has a round with nobody online, one with fewer online than asked, and sampling among more.
    counts = [len(online_clients(cfg["seed"], k, N, cfg["availability"])) for k in range(1, cfg["rounds"] + 1)]
    assert 0 in counts and any(0 < c < 4 for c in counts) and any(c > 4 for c in counts)
    empty = counts.index(0)
    assert flower["clip21-sgd2m"]["records"][empty]["accepted"] == 0
    # The epsilon counts only the rounds a client was asked.
    asked = np.zeros(N, dtype=int)
    for k in range(1, cfg["rounds"] + 1):
        asked[sample_clients(cfg["seed"], k, N, cfg["fraction"], cfg["availability"])] += 1
    from fl_clip21.privacy import epsilon

    z = cfg["sigma"] / (2 * cfg["tau"])
    assert flower["clip21-sgd2m"]["records"][-1]["epsilon"] == pytest.approx(epsilon(z, int(asked.max()), cfg["delta"]))


def test_availability_one_samples_as_before():
    for k in range(1, 6):
        rng = np.random.default_rng([3, 0x5A3D1E, k])
        assert sample_clients(3, k, 20, 0.25, 1.0) == sorted(int(c) for c in rng.choice(20, size=5, replace=False))
    assert sample_clients(3, 1, 20, 1.0, 1.0) == list(range(20))


def test_online_draws_are_seeded_per_client_and_round():
    a = online_clients(0, 5, 50, 0.5)
    assert a == online_clients(0, 5, 50, 0.5)
    assert [i for i in online_clients(0, 5, 80, 0.5) if i < 50] == a  # a client's draw does not depend on n
    assert a != online_clients(0, 6, 50, 0.5) and a != online_clients(1, 5, 50, 0.5)
    share = np.mean([len(online_clients(0, k, 100, 0.3)) for k in range(1, 201)]) / 100
    assert share == pytest.approx(0.3, abs=0.02)


def test_a_round_with_nobody_online_sends_nothing_and_keeps_the_model():
    cfg = resolve({**AVAILABILITY, "algorithms": ["gd"], "sigma": 0.0, "availability": 0.01, "rounds": 3})
    assert all(not online_clients(cfg["seed"], k, N, 0.01) for k in range(1, 4))
    res = run_local(cfg, "gd")
    assert [r["participants"] for r in res["records"]] == [0, 0, 0]
    assert all(r["clip_fraction"] == 0.0 and r["failed"] == 0 for r in res["records"])
    np.testing.assert_array_equal(res["params"]["w"], build_problem(cfg).init_params()["w"])


# --- stragglers ---------------------------------------------------------------------


def _late(cfg, k):
    """The clients late in round ``k``."""
    return {int(i) for i in np.flatnonzero(late_rows(cfg, k, np.arange(N)))}


def test_late_replies_are_dropped_and_counted_as_failed_on_both_engines(runs):
    cfg, flower, vectorized = runs[0]["stragglers"]
    late = [_late(cfg, k) for k in range(1, cfg["rounds"] + 1)]
    assert [sorted(s) for s in late] == [[4, 6], [], [], [6]]
    for name in cfg["algorithms"]:
        for engine in (flower, vectorized):
            recs = engine[name]["records"]
            assert [r["failed"] for r in recs] == [len(s) for s in late]
            assert [r["accepted"] for r in recs] == [N - len(s) for s in late]
            assert all(r["rejected"] == 0 and r["resyncs"] == 0 for r in recs)
    for key in ("invariant_gap", "memory_gap"):
        assert max(r[key] for r in flower["clip21-gd"]["records"]) < GAP, key


def test_straggler_delay_and_late_rows_agree():
    cfg = resolve({**STRAGGLERS, "rounds": 30})
    for k in range(1, 31):
        slow = {i for i in range(N) if straggler_delay(cfg, i, k) == 4.5}
        assert all(straggler_delay(cfg, i, k) in (0.0, 4.5) for i in range(N))
        assert _late(cfg, k) == slow
    # Without a round timeout (or with one longer than the delay) slow replies still count.
    for timeout in (0.0, 5.0):
        assert not _late(resolve({**STRAGGLERS, "round-timeout": timeout}), 1)


def test_vectorized_engine_keeps_g_equal_to_the_mean_memory_through_drops():
    cfg = resolve({**STRAGGLERS, "rounds": 30, "straggler-fraction": 0.3, "availability": 0.7})
    res = run_local(cfg, "clip21-gd")
    assert sum(r["failed"] for r in res["records"]) > 10
    mean_v = res["client_states"]["v"].mean(axis=0)  # the stacked (n, d) memories
    np.testing.assert_allclose(res["server_state"]["g"]["w"], mean_v, rtol=0, atol=GAP)


# --- uneven data sizes --------------------------------------------------------------


def test_uneven_partition_sizes(runs):
    cfg, _, _ = runs[0]["sizes"]
    problem = build_problem(cfg)
    assert [p.size for p in problem.parts] == [2, 11, 25, 44, 69, 100, 136, 182]
    assert client_sizes(cfg, 569) == [2, 11, 25, 44, 69, 100, 136, 182]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "label-sorted"])
@pytest.mark.parametrize("sizes", ["linear", "square", "exponential"])
def test_every_partition_kind_takes_the_sizes(kind, sizes):
    cfg = resolve({
        **_COMMON, "num-clients": 5, "seed": 1, "partition": {"kind": kind, "sizes": sizes, "alpha": 0.5},
    })
    parts = build_problem(cfg).parts
    expected = client_sizes(cfg, 569)
    assert [p.size for p in parts] == expected and sum(expected) == 569
    assert expected == sorted(expected) and expected[0] < expected[-1] / 3
    allrows = np.concatenate(parts)
    assert np.unique(allrows).size == allrows.size == 569


def test_objective_weighs_clients_equally_whatever_their_size():
    cfg = resolve(SIZES)
    problem = build_problem(cfg)
    w = {"w": np.random.default_rng(0).normal(0, 0.3, problem.X.shape[1])}
    reg = problem.reg * np.sum(w["w"] ** 2 / (1 + w["w"] ** 2))
    per_row = np.logaddexp(0.0, -problem.signs * (problem.X @ w["w"]))
    by_client = np.mean([per_row[p].mean() for p in problem.parts]) + reg
    assert problem.loss(w) == pytest.approx(by_client, rel=1e-12)
    assert abs(problem.loss(w) - (per_row.mean() + reg)) > 1e-3  # not the loss over all rows
    grads = [problem.client_grad(i, w)["w"] for i in range(N)]
    np.testing.assert_allclose(problem.grad(w)["w"], np.mean(grads, axis=0), rtol=1e-10, atol=1e-14)


def test_a_client_smaller_than_the_batch_uses_all_its_rows():
    from fl_clip21.problems import Minibatch

    problem = build_problem(resolve(SIZES))
    w = problem.init_params()
    batch = Minibatch(seed=0, round=1, size=16)
    np.testing.assert_array_equal(problem.client_grad(0, w, batch)["w"], problem.client_grad(0, w)["w"])
    rows, owner, weight = problem.rows(np.array([0, 7]), batch)
    assert np.bincount(owner).tolist() == [problem.sizes[0], 16] and problem.sizes[0] < 16 < problem.sizes[7]
    np.testing.assert_allclose(weight, np.repeat([1 / problem.sizes[0], 1 / 16], [problem.sizes[0], 16]))


# --- bad values ----------------------------------------------------------------------

BAD = [
    ({"availability": 0}, "availability", "0"),
    ({"availability": 1.5}, "availability", "1.5"),
    ({"straggler-fraction": -0.1}, "straggler-fraction", "-0.1"),
    ({"straggler-fraction": 1.2}, "straggler-fraction", "1.2"),
    ({"straggler-delay": -1}, "straggler-delay", "-1"),
    ({"round-timeout": -2}, "round-timeout", "-2"),
    ({"round-timeout": "soon"}, "round-timeout", "soon"),
    ({"partition": {"sizes": "zipf"}}, "partition.sizes", "zipf"),
    ({"straggler-fraction": 0.2}, "straggler-delay", "0.0"),
    ({"algorithms": ["clip21-gd", "flower-dp-fixed"], "availability": 0.5}, "availability", "0.5"),
    ({"partition": {"kind": "pathological", "sizes": "linear"}}, "partition.sizes", "linear"),
    ({"problem": {"name": "mean-estimation"}, "partition": {"sizes": "square"}}, "partition.sizes", "square"),
]


@pytest.mark.parametrize("scenario, key, value", BAD, ids=[f"{k}={v}" for _, k, v in BAD])
def test_bad_values_are_config_errors_naming_key_and_value(scenario, key, value):
    base = {"problem": {"name": "logreg"}}
    merged = {**base, **scenario}
    with pytest.raises(ConfigError) as err:
        resolve(merged)
    assert key in str(err.value) and value in str(err.value), str(err.value)


def test_sizes_that_leave_a_client_without_rows_are_a_config_error():
    cfg = resolve({**_COMMON, "num-clients": 10, "partition": {"kind": "iid", "sizes": "exponential"}})
    with pytest.raises(ConfigError, match=r"partition.sizes='exponential'.*client 0 with 0 of the 569"):
        build_problem(cfg)


def test_cli_run_help_lists_the_heterogeneity_keys(capsys):
    from fl_clip21.cli import main

    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    for key in ("availability", "straggler-fraction", "straggler-delay", "round-timeout", "partition.sizes"):
        assert f"  {key} " in listed, listed
