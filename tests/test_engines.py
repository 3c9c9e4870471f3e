"""The vectorized engine against Flower's simulation engine: same algorithms, same numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_clip21.algorithms import ALGORITHMS
from fl_clip21.config import ConfigError, resolve
from fl_clip21.engine import run_local, run_vectorized
from fl_clip21.problems import Minibatch, PluginProblem, build_problem

ROOT = Path(__file__).resolve().parent.parent

# Small problems, a few rounds: every algorithm without noise, full participation on
# one problem, partial on the other; local noise (clip-sgd, clip21-sgd2m); central DP
# with Poisson sampling (DP-FedAvg, adaptive clipping's noisy count included). Momentum, minibatches and two local steps (celgc) throughout.
_COMMON = {
    "rounds": 3, "num-clients": 4, "seed": 5, "topk": 2, "batch-size": 16, "beta1": 0.5, "beta2": 0.8,
    "local-steps": 2,
}
LOCAL_NOISE = ["clip-sgd", "clip21-sgd2m"]
CENTRAL = ["clip-sgd", "clip21-gd", "clip21-sgd2m", "clip21-topk", "dp-fedavg", "dp-fedavg-adaptive"]
CONFIGS = {
    "mean-estimation": {
        **_COMMON, "algorithms": list(ALGORITHMS), "lr": 0.5, "tau": 0.5,
        "problem": {"name": "mean-estimation", "dim": 3, "spread": 2.0},
    },
    "logreg-partial": {
        **_COMMON, "algorithms": list(ALGORITHMS), "lr": 1.0, "tau": 0.1, "fraction": 0.5,
        "problem": {"name": "logreg"}, "partition": {"kind": "dirichlet", "alpha": 1.0},
    },
    "local-noise": {
        **_COMMON, "algorithms": LOCAL_NOISE, "lr": 1.0, "tau": 0.1, "fraction": 0.5, "sigma": 0.05,
        "problem": {"name": "logreg"}, "partition": {"kind": "dirichlet", "alpha": 1.0},
    },
    "central": {
        **_COMMON, "algorithms": CENTRAL, "lr": 1.0, "tau": 0.1, "fraction": 0.5, "sigma": 0.05, "dp": "central",
        "sampling": "poisson", "count-stddev": 1.0, "problem": {"name": "logreg"}, "partition": {"kind": "dirichlet", "alpha": 1.0},
    },
}
NOT_COMPARED = {"seconds"}  # every field of a record (fl_clip21.fault_protocol.round_record) but the time taken


@pytest.fixture(scope="module")
def both_engines():
    from fl_clip21.flower.simulation import simulate

    out = {}
    for key, scenario in CONFIGS.items():
        cfg = resolve(scenario)
        # One simulation per config: a node's client state outlives a config in a
        # multi-config simulate call (reported); every algorithm in one Ray start.
        out[key] = (simulate(cfg), run_vectorized(cfg))
    return out


@pytest.mark.parametrize("config, name", [(c, n) for c, s in CONFIGS.items() for n in s["algorithms"]])
def test_vectorized_engine_matches_flower(both_engines, config, name):
    flower, vectorized = (res[name] for res in both_engines[config])
    for key, arr in flower["params"].items():
        np.testing.assert_allclose(vectorized["params"][key], arr, rtol=0, atol=1e-10)
    assert set(vectorized) == {"records", "params", "wall_seconds"}
    assert len(vectorized["records"]) == len(flower["records"]) == 3
    for fr, vr in zip(flower["records"], vectorized["records"]):
        assert set(fr) == set(vr), (fr, vr)
        assert vr["round"] == fr["round"]
        for key in set(fr) - NOT_COMPARED:
            assert vr[key] == pytest.approx(fr[key], rel=1e-9, abs=1e-14), (key, vr["round"])


def test_the_configs_exercise_clipping_noise_and_sampling(both_engines):
    _, vec = both_engines["logreg-partial"]
    assert all(r["participants"] == 2 for r in vec["clip21-sgd2m"]["records"])
    assert vec["clip21-gd"]["records"][0]["clip_fraction"] == 1.0
    assert "epsilon" not in vec["clip21-sgd2m"]["records"][-1]  # no noise asked for, none claimed
    _, vec = both_engines["local-noise"]
    assert all(r["epsilon"] > 0 for name in LOCAL_NOISE for r in vec[name]["records"])
    _, vec = both_engines["central"]
    # Poisson sampling: the number of clients varies from round to round, epsilon grows with the rounds.
    assert len({r["participants"] for name in CENTRAL for r in vec[name]["records"]}) > 1
    eps = [r["epsilon"] for r in vec["clip21-gd"]["records"]]
    assert 0 < eps[0] < eps[1] < eps[2]


def test_vectorized_engine_refuses_flower_dp_fixed_before_running():
    cfg = resolve({"algorithms": ["gd", "flower-dp-fixed"], "num-clients": 3})
    with pytest.raises(ConfigError, match="flower-dp-fixed"):
        run_vectorized(cfg)


@pytest.mark.parametrize("batch_size", [None, 16, 10_000])
def test_batched_logreg_grads_are_each_clients_own_whatever_the_batch(batch_size):
    cfg = resolve({"num-clients": 5, "problem": {"name": "logreg"}, "partition": {"kind": "dirichlet", "alpha": 0.5}})
    problem = build_problem(cfg)
    w = np.random.default_rng(1).normal(0.0, 0.5, size=problem.X.shape[1])
    clients = np.array([0, 2, 3])
    batch = Minibatch(seed=7, round=3, size=batch_size) if batch_size else None
    batched = problem.grads(w, clients, batch)
    per_row = problem.grads(np.tile(w, (3, 1)), clients, batch)  # one point per row (CELGC, sweeps)
    for j, i in enumerate(clients):
        alone = problem.grads(w, np.array([i]), batch)[0]
        np.testing.assert_allclose(batched[j], alone, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(per_row[j], alone, rtol=1e-12, atol=1e-15)


def test_a_plug_in_problem_draws_each_clients_minibatch_from_its_own_stream():
    class Plain:
        num_clients, classification = 3, False

        def init_params(self):
            return {"x": np.zeros(2)}

        def client_grad(self, i, params, rng=None, batch_size=None):
            return {"x": params["x"] * i + (rng.normal() if rng is not None else 0.0)}

        def loss(self, params):
            return 0.0

        def grad(self, params):
            return {"x": params["x"]}

        def accuracy(self, params):
            return None

    problem = PluginProblem(Plain())
    batch = Minibatch(seed=1, round=2, size=4)
    together = problem.grads(np.ones(2), np.arange(3), batch)
    for i in range(3):
        np.testing.assert_array_equal(together[i], problem.grads(np.ones(2), np.array([i]), batch)[0])
    assert together[0, 0] != 0 and not np.array_equal(together, problem.grads(np.ones(2), np.arange(3), None))


@pytest.mark.parametrize("name, calls", [("clip21-gd", 1), ("celgc", 3 * 2)])
def test_run_local_takes_full_gradients_from_the_evaluation_of_the_same_model(monkeypatch, name, calls):
    # Full batch, full participation: round 1's gradients are computed, every later
    # round reads them from the evaluation at the same model. CELGC's local steps
    # are at other points: one batched call per local step (2) and round.
    cfg = resolve({**CONFIGS["logreg-partial"], "algorithms": [name], "rounds": 3, "fraction": 1.0})
    problem = build_problem(cfg)
    counted = []
    original = problem.grads
    monkeypatch.setattr(problem, "grads", lambda *a: counted.append(1) or original(*a))
    run_local(cfg, name)
    assert len(counted) == calls


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "run", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_run_with_the_vectorized_engine(tmp_path):
    out = tmp_path / "out"
    proc = _cli(str(ROOT / "scenarios" / "mean-estimation.toml"), "--engine", "vectorized", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    algos = json.loads((out / "metrics.json").read_text())["algorithms"]
    assert set(algos) == {"gd", "clip-gd", "clip21-gd"}
    assert 8 / 3 - np.sqrt(algos["clip-gd"][-1]["grad_norm_sq"]) == pytest.approx(-0.5, abs=1e-6)
    assert algos["clip21-gd"][-1]["grad_norm_sq"] < 1e-16
    assert (out / "convergence.png").stat().st_size > 1000


def test_cli_vectorized_engine_with_flower_dp_fixed_exits_2(tmp_path):
    proc = _cli(
        str(ROOT / "scenarios" / "mean-estimation.toml"), "--engine", "vectorized",
        "--set", "algorithms=clip21-gd,flower-dp-fixed", "--out", str(tmp_path / "out"), cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "flower-dp-fixed" in proc.stderr and "--engine flower" in proc.stderr
    assert not (tmp_path / "out").exists()
