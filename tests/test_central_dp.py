"""Central (user-level) DP: the server noises the sum of clipped messages; no run asked to be private goes without."""

from __future__ import annotations

import numpy as np
import pytest

import csv
import math

from hypothesis import given
from hypothesis import strategies as st

from fl_clip21 import streams
from fl_clip21.algorithms import algorithm_from_config, central_sampling, make_algorithm, with_central_dp
from fl_clip21.cells import run_cells
from fl_clip21.config import ConfigError, expand_runs, resolve, with_epsilon
from fl_clip21.engine import run_local, sample_clients
from fl_clip21.privacy import calibrate_central, calibrate_noise_multiplier, central_epsilon, epsilon, gdp_epsilon
from fl_clip21.report import SECURE_NOISE_NOTE, summary_markdown


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


# --- fixed-size sampling: replace-one adjacency (docs/algorithms.md, "Central (user-level) DP") -----


def test_adding_a_client_changes_who_else_a_fixed_size_sample_draws():
    # Why add/remove-one does not hold for a fixed-size sample: with one more client, other clients
    # are drawn, so one client moves the sum by far more than tau.
    changed = [set(sample_clients(0, k, 20, 0.2)) ^ set(sample_clients(0, k, 21, 0.2)) - {20} for k in range(1, 6)]
    assert all(len(c) >= 2 for c in changed)


@pytest.mark.parametrize("n, fraction, sampling, expected", [
    (10, 0.5, "fixed", (5.0, 1.0, True)),  # 5 of 10: replace-one
    (10, 1.0, "fixed", (10.0, 1.0, False)),  # everyone: add/remove-one
    (10, 0.99, "fixed", (10.0, 1.0, False)),  # round(9.9) = 10: everyone
    (10, 0.5, "poisson", (5.0, 0.5, False)),
])
def test_central_sampling_names_the_adjacency(n, fraction, sampling, expected):
    assert central_sampling({"num-clients": n, "fraction": fraction, "sampling": sampling}) == expected


def test_fixed_size_sampling_is_accounted_at_half_the_multiplier_without_amplification():
    cfg = _cfg(fraction=0.5, rounds=4, sigma=0.4, **{"num-clients": 10})  # z = sigma / tau = 2
    algorithm = algorithm_from_config("clip21-gd", cfg)
    assert algorithm.noise_multiplier == 1.0 and algorithm.hyper["sampling-rate"] == 1.0
    assert algorithm.central.std == 0.4  # the noise itself is what was asked for
    last = run_local(cfg, "clip21-gd")["records"][-1]
    assert last["noise_multiplier"] == 1.0 and last["epsilon"] == epsilon(1.0, 4, cfg["delta"])
    everyone = algorithm_from_config("clip21-gd", {**cfg, "fraction": 1.0})
    assert everyone.noise_multiplier == 2.0


def test_target_epsilon_with_a_fixed_size_sample_calibrates_for_replace_one():
    # Before: sigma = tau z(3.0) = 1.2438; its true (replace-one) epsilon was 6.71, reported as 3.
    cfg = resolve({"rounds": 20, "num-clients": 10, "fraction": 0.5, "dp": "central", "algorithms": ["clip21-gd"],
                   "tau": 0.2})
    sigma = with_epsilon(cfg, 3.0)["sigma"]
    assert sigma == pytest.approx(2.4875692010401, rel=1e-9)  # 2 tau z, z = 6.21892300 (pinned)
    assert sigma == 2 * 0.2 * calibrate_noise_multiplier(3.0, 20, 1e-5)
    assert epsilon(0.2 * 6.218923002600256 / 0.2 / 2, 20, 1e-5) == pytest.approx(6.7061332, rel=1e-6)
    (run,) = expand_runs({**cfg, "target-epsilon": [3.0], "problem.name": "logreg"})
    last = run_local(run, "clip21-gd")["records"][-1]
    assert 2.99 < last["epsilon"] <= 3.0


def test_replace_one_epsilon_pinned():
    # z = 2 under replace-one is the Gaussian mechanism of multiplier 1: 100 rounds at delta 1e-5.
    assert epsilon(2.0 / 2, 100, 1e-5) == pytest.approx(91.8172896, rel=1e-6)
    assert epsilon(2.0, 100, 1e-5) == pytest.approx(33.1037323, rel=1e-6)


# --- a second accountant: the closed form of mu-GDP (scipy) ------------------------------


@given(z=st.floats(0.3, 50), rounds=st.integers(1, 2000), delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_reported_epsilon_is_never_below_the_closed_form_of_gaussian_dp(z, rounds, delta):
    # T Gaussian mechanisms of multiplier z are exactly mu-GDP, mu = sqrt(T) / z (Dong, Roth, Su).
    exact = gdp_epsilon(math.sqrt(rounds) / z, delta)
    for reported in (epsilon(z, rounds, delta), central_epsilon(z, rounds, delta, 1.0)):
        assert reported >= exact - 1e-9
        assert reported == pytest.approx(exact, rel=1e-6, abs=1e-8)


def test_gdp_epsilon_pinned_and_checked():
    assert gdp_epsilon(10.0, 1e-5) == pytest.approx(91.8172896, rel=1e-6)
    assert gdp_epsilon(1e-6, 1e-5) == 0.0  # delta(0) = 2 Phi(mu / 2) - 1 < 1e-5: epsilon 0 suffices
    with pytest.raises(ValueError, match="mu must be > 0, got 0"):
        gdp_epsilon(0.0, 1e-5)


# --- secure-noise: noise no one who knows the seed can subtract ----------------------------


def _private(**over):
    return _cfg(rounds=3, fraction=0.5, sampling="poisson", **{"num-clients": 10}, **over)


def test_secure_noise_makes_runs_differ_and_seeded_runs_repeat():
    for cfg, name in ((_private(), "clip21-gd"), (_private(dp="local", algorithms=["clip-sgd"]), "clip-sgd")):
        seeded = [run_local(cfg, name)["params"]["w"] for _ in range(2)]
        np.testing.assert_array_equal(*seeded)
        secure = [run_local({**cfg, "secure-noise": True}, name) for _ in range(2)]
        assert np.abs(secure[0]["params"]["w"] - secure[1]["params"]["w"]).max() > 1e-6
        assert all("epsilon" in r for r in secure[0]["records"])


def test_secure_noise_draws_the_poisson_sample_from_os_entropy():
    a, b = (sample_clients(0, k, 40, 0.5, poisson=True, secure=True) for k in (1, 1))
    assert a != b  # equal with probability 2^-40
    assert sample_clients(0, 1, 40, 0.5, poisson=True) == sample_clients(0, 1, 40, 0.5, poisson=True)


def test_secure_noise_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match=r"secure-noise=true .* this run adds no noise \(sigma=0"):
        resolve({"algorithms": ["clip21-gd"], "secure-noise": True})
    with pytest.raises(ConfigError, match=r"secure-noise must be true or false, got 'maybe'"):
        resolve({"algorithms": ["clip21-gd"]}, {"secure-noise": "maybe"})
    with pytest.raises(ConfigError, match=r"secure-noise=true .* tune compare cells on seeds"):
        run_cells([{**_private(), "secure-noise": True}], "clip21-gd")


def test_the_summary_says_when_the_run_cannot_be_reproduced():
    row = {"algorithm": "clip21-gd", "epsilon": 3.0, "seeds": 1, "final_loss": 0.5}
    assert SECURE_NOISE_NOTE in summary_markdown([row], "t", 1e-3, secure_noise=True)
    assert SECURE_NOISE_NOTE not in summary_markdown([row], "t", 1e-3)


@pytest.mark.parametrize("dp", ["local", "central"])
def test_the_summary_epsilon_column_is_never_blank_for_a_private_run(dp, tmp_path):
    # Every algorithm that adds noise in this mode, the DP-FedAvg baselines included
    # (Flower's own: tests/test_dp_baselines.py).
    from fl_clip21.algorithms import ALGORITHMS
    from fl_clip21.config import _adds_noise
    from fl_clip21.engine import run_vectorized
    from fl_clip21.report import write_outputs

    names = [a for a in ALGORITHMS if _adds_noise(a, dp)]
    assert {"dp-fedavg", "dp-fedavg-adaptive"} <= set(names) and len(names) >= (8 if dp == "central" else 4)
    cfg = _cfg(dp=dp, rounds=2, fraction=0.5, algorithms=names, **{"num-clients": 10, "count-stddev": 5.0})
    (run,) = expand_runs({**cfg, "target-epsilon": [5.0]})
    rows = write_outputs(tmp_path, [(run, run_vectorized(run))])
    assert {r["algorithm"] for r in rows} == set(names)
    for row in csv.DictReader((tmp_path / "summary.csv").open()):
        assert 0 < float(row["epsilon"]) and float(row["noise_multiplier"]) > 0, row


@pytest.mark.parametrize(("key", "value"), [
    ("secure-noise", "2"), ("target-quantile", "1.5"), ("target-quantile", "-0.1"), ("clip-lr", "0"),
    ("count-stddev", "-1"), ("clip-lr", "nan"),
])
def test_bad_dp_keys_name_key_and_value(key, value):
    with pytest.raises(ConfigError) as err:
        resolve({}, {key: value})
    assert key in str(err.value) and value in str(err.value)
