"""Central (user-level) DP: the server noises the sum of clipped messages; no run asked to be private goes without."""

from __future__ import annotations

import numpy as np
import pytest

from fl_clip21 import streams
from fl_clip21.algorithms import algorithm_from_config, make_algorithm, with_central_dp
from fl_clip21.config import ConfigError, expand_runs, resolve
from fl_clip21.engine import run_local
from fl_clip21.privacy import calibrate_central, central_epsilon, epsilon


def _cfg(**over):
    base = {"rounds": 8, "num-clients": 6, "lr": 0.5, "tau": 0.2, "problem": {"name": "logreg"},
            "partition": {"kind": "label-sorted"}, "dp": "central", "sigma": 0.1, "algorithms": ["clip21-gd"]}
    base.update(over)
    return resolve(base)


@pytest.mark.parametrize("name", ["clip21-sgd", "gd", "celgc", "ef21-topk"])
def test_an_algorithm_that_adds_no_noise_refuses_sigma_naming_itself_and_the_key(name):
    # Before: clip21-sgd ignored sigma and target-epsilon and ran noise-free, epsilon "-".
    with pytest.raises(ConfigError, match=rf"algorithms: {name} adds no noise with dp=local.*sigma=0.5"):
        resolve({"algorithms": [name, "clip-sgd"], "sigma": 0.5})
    with pytest.raises(ConfigError, match=rf"algorithms: {name} adds no noise.*target-epsilon=\[3.0\]"):
        resolve({"algorithms": [name], "target-epsilon": [3]})


def test_clip21_adds_central_noise_and_says_where_it_cannot():
    assert resolve({"algorithms": ["clip21-sgd"], "sigma": 0.5, "dp": "central"})["dp"] == "central"
    with pytest.raises(ConfigError, match=r"celgc adds no noise with dp=central"):
        resolve({"algorithms": ["celgc"], "sigma": 0.5, "dp": "central"})
    with pytest.raises(ConfigError, match=r"clip21-sgd adds no noise with dp=local \(it does with dp=central\)"):
        resolve({"algorithms": ["clip21-sgd"], "sigma": 0.5})


def test_the_server_adds_its_seeded_noise_to_the_sum_once_a_round():
    # Prepare: Clip21-GD under central DP; its clients send what they send without DP.
    cfg = _cfg()
    noisy, quiet = run_local(cfg, "clip21-gd"), run_local({**cfg, "sigma": 0.0}, "clip21-gd")
    algorithm = algorithm_from_config("clip21-gd", cfg)
    assert algorithm.central.std == 0.1 and algorithm.central.denominator == 6 and algorithm.noise_multiplier == 0.5
    # Execute: g = mean(v_i) + (1/n) sum_k sigma xi_k, the server's draws of every round.
    d = noisy["params"]["w"].size
    xi = sum(streams.normals(cfg["seed"], streams.SERVER_NOISE, np.zeros(1, dtype=np.int64), k, d)[0]
             for k in range(1, cfg["rounds"] + 1))
    gap = noisy["server_state"]["g"]["w"] - noisy["client_states"]["v"].mean(axis=0)
    # Assert
    np.testing.assert_allclose(gap, 0.1 * xi / 6, rtol=1e-9, atol=1e-14)
    assert np.abs(noisy["params"]["w"] - quiet["params"]["w"]).max() > 1e-3
    assert all("epsilon" in r for r in noisy["records"]) and "epsilon" not in quiet["records"][-1]


def test_clip_sgd_divides_the_noisy_sum_by_the_fixed_denominator():
    alg = with_central_dp(make_algorithm("clip-gd", lr=1.0, tau=1.0), sigma=0.5, denominator=4)
    x = np.zeros(2)
    messages = np.array([[1.0, 0.0], [0.0, 1.0]])  # 2 of the expected 4 clients replied
    xi = np.array([0.2, -0.4])
    new_x, _ = alg.server_round(x, {}, messages, n=8, noise=lambda: xi)
    np.testing.assert_allclose(new_x, -(messages.sum(axis=0) + 0.5 * xi) / 4)
    with pytest.raises(ValueError, match="needs the round's server noise"):
        alg.server_round(x, {}, messages, n=8)


def test_poisson_sampling_draws_each_client_with_the_fraction():
    cfg = _cfg(fraction=0.3, sampling="poisson", rounds=60, **{"num-clients": 20})
    counts = [r["participants"] for r in run_local(cfg, "clip21-gd")["records"]]
    assert len(set(counts)) > 3 and abs(np.mean(counts) - 6) < 1.5
    assert algorithm_from_config("clip21-gd", cfg).central.denominator == pytest.approx(6.0)


@pytest.mark.parametrize("z, rounds, delta, q", [(1.0, 100, 1e-5, 0.1), (0.8, 50, 1e-3, 0.02), (2.0, 500, 1e-5, 0.3)])
def test_central_epsilon_is_dp_accountings_and_never_below_the_tighter_pld(z, rounds, delta, q):
    from dp_accounting import GaussianDpEvent, NeighboringRelation, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds))
    ours = central_epsilon(z, rounds, delta, q)
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert ours >= central_epsilon(z, rounds, delta, q, accountant="pld") - 1e-9
    assert ours < epsilon(z, rounds, delta)  # amplification by subsampling helps


def test_central_epsilon_pinned():
    # dp-accounting 0.6's RDP accountant (add/remove one), recorded when this was written.
    assert central_epsilon(1.0, 100, 1e-5, 0.1) == pytest.approx(7.9038502, rel=1e-6)
    assert central_epsilon(1.0, 100, 1e-5, 1.0) == pytest.approx(91.8172896, rel=1e-6)  # no amplification: exact


def test_target_epsilon_calibrates_the_central_noise():
    cfg = _cfg(**{"target-epsilon": [3.0], "fraction": 0.5, "sampling": "poisson", "rounds": 20})
    (run,) = expand_runs(cfg)
    z = run["sigma"] / run["tau"]
    assert z == pytest.approx(calibrate_central(3.0, 20, cfg["delta"], 0.5))
    last = run_local(run, "clip21-gd")["records"][-1]
    assert 2.99 < last["epsilon"] <= 3.0
