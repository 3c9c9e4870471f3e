"""DP-FedAvg: Flower's DP strategies (seeded, resumable) against the batched dp-fedavg; the Clip21CentralDP wrapper.

docs/algorithms.md, "DP-FedAvg" and "Central (user-level) DP".
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

from fl_clip21 import streams
from fl_clip21.algorithms import adaptive_noise, algorithm_from_config, make_algorithm
from fl_clip21.config import ConfigError, expand_runs, resolve, with_epsilon
from fl_clip21.engine import evaluate, run_local
from fl_clip21.flower import dp_baseline
from fl_clip21.flower.client import make_client_app
from fl_clip21.flower.simulation import fast_polling, simulate_app
from fl_clip21.flower.strategy import Clip21Strategy
from fl_clip21.privacy import central_epsilon
from fl_clip21.problems import build_problem
from fl_clip21.report import write_outputs

BASELINES = ["flower-dp-client-fixed", "flower-dp-server-fixed", "flower-dp-adaptive"]
BATCHED = {"flower-dp-client-fixed": "dp-fedavg", "flower-dp-server-fixed": "dp-fedavg",
           "flower-dp-adaptive": "dp-fedavg-adaptive"}


def _cfg(**over):
    base = {
        "rounds": 3, "num-clients": 4, "seed": 5, "lr": 0.5, "tau": 0.05, "fraction": 0.5, "sigma": 0.05,
        "dp": "central", "local-steps": 2, "batch-size": 16, "count-stddev": 1.0, "algorithms": BASELINES,
        "problem": {"name": "logreg"}, "partition": {"kind": "dirichlet", "alpha": 1.0},
    }
    base.update(over)
    return resolve(base)


@pytest.fixture(scope="module")
def flower_runs(simulation):
    """Flower's three DP strategies (2 of 4 clients a round, central noise): (cfg, results)."""
    return simulation["baselines"]


@pytest.mark.parametrize("name", BASELINES)
def test_batched_dp_fedavg_equals_flowers_dp_strategy_with_the_same_sampling_and_noise(flower_runs, name):
    cfg, flower = flower_runs
    batched = run_local(cfg, BATCHED[name])
    for key, arr in flower[name]["params"].items():
        np.testing.assert_allclose(batched["params"][key], arr, rtol=0, atol=1e-12)
    assert np.abs(flower[name]["params"]["w"] - build_problem(cfg).init_params()["w"]).max() > 1e-3
    for fr, br in zip(flower[name]["records"], batched["records"], strict=True):
        for key in ("round", "participants", "accepted", "epsilon", "noise_multiplier", "loss", "accuracy"):
            assert fr[key] == pytest.approx(br[key], rel=1e-9), key


def test_flower_baselines_epsilon_and_multiplier_are_what_the_summary_reports(flower_runs, tmp_path):
    cfg, flower = flower_runs
    # Flower's noise_multiplier is sigma / tau = 1 (dp=central); 2 of 4 clients a round is
    # replace-one adjacency, so the accountant uses 1/2, over every round, no amplification.
    assert dp_baseline.make_strategy("flower-dp-client-fixed", cfg, build_problem(cfg).layout).noise_multiplier == 1.0
    rows = {r["algorithm"]: r for r in write_outputs(tmp_path, [(cfg, flower)])}
    table = {r["algorithm"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    for name in BASELINES:
        last = flower[name]["records"][-1]
        assert last["noise_multiplier"] == 0.5
        assert last["epsilon"] == central_epsilon(0.5, 3, cfg["delta"])
        assert rows[name]["epsilon"] == last["epsilon"] and float(table[name]["epsilon"]) == last["epsilon"]
        assert float(table[name]["noise_multiplier"]) == 0.5


def test_the_noise_actually_added_has_the_reported_multiplier():
    # dp-fedavg computes Flower's iterates (above): one round with and without noise differ by
    # -(z C / m) xi, xi the server's draw of the round, z = sigma / tau, C = lr tau, m = 2.
    cfg = _cfg(rounds=1, algorithms=["dp-fedavg"])
    noisy, quiet = (run_local(c, "dp-fedavg")["params"]["w"] for c in (cfg, {**cfg, "sigma": 0.0}))
    xi = streams.normals(cfg["seed"], streams.SERVER_NOISE, np.zeros(1, dtype=np.int64), 1, noisy.size)[0]
    z, clip = cfg["sigma"] / cfg["tau"], cfg["lr"] * cfg["tau"]
    np.testing.assert_allclose(noisy - quiet, -(z * clip / 2) * xi, rtol=1e-9, atol=1e-15)


def test_flower_baselines_noise_follows_the_dp_mode():
    central, local = _cfg(), _cfg(dp="local")
    assert dp_baseline.noise_multiplier(central) == pytest.approx(1.0)  # sigma / tau, as with_epsilon calibrates
    assert dp_baseline.noise_multiplier(local) == pytest.approx(0.5)  # sigma / (2 tau), the local algorithms' z
    assert algorithm_from_config("dp-fedavg", local).central.std == pytest.approx(0.5 * 0.05 / 2)


def test_target_epsilon_under_central_dp_is_what_flowers_baselines_run_at():
    # Before: Flower's strategy took z = sigma / (2 tau) whatever dp said, half the noise
    # with_epsilon calibrated for dp=central (target 3 ran at 6.71).
    for sampling_fraction in (0.5, 1.0):
        cfg = with_epsilon(_cfg(rounds=20, fraction=sampling_fraction, algorithms=["flower-dp-client-fixed"]), 3.0)
        eps = central_epsilon(dp_baseline.accounted(cfg), 20, cfg["delta"])
        assert 2.99 < eps <= 3.0
        assert dp_baseline.noise_multiplier(cfg) == pytest.approx(cfg["sigma"] / cfg["tau"])


@pytest.mark.parametrize("name", BASELINES + ["flower-dp-fixed"])
def test_flower_baselines_refuse_poisson_sampling_naming_algorithm_key_and_value(name):
    with pytest.raises(ConfigError, match=rf"sampling='poisson' is not supported by {name}: .* use dp-fedavg"):
        _cfg(algorithms=[name], sampling="poisson")
    assert _cfg(algorithms=["dp-fedavg"], sampling="poisson")["sampling"] == "poisson"


def test_dp_fedavg_with_one_local_step_is_clip_sgd_under_central_dp():
    # The mapping: dp-fedavg clips the update lr * grad to C = lr tau, i.e. the gradient to tau,
    # and its noise std on the sum is lr sigma: clip-sgd's step lr (sum clip_tau(g_i) + sigma xi) / m.
    cfg = _cfg(**{"local-steps": 1}, fraction=0.5, sampling="poisson", rounds=4, algorithms=["dp-fedavg", "clip-sgd"])
    a, b = run_local(cfg, "dp-fedavg"), run_local(cfg, "clip-sgd")
    np.testing.assert_allclose(a["params"]["w"], b["params"]["w"], rtol=0, atol=1e-12)
    assert [r["epsilon"] for r in a["records"]] == [r["epsilon"] for r in b["records"]]
    assert a["records"][0]["clip_fraction"] > 0


# --- adaptive clipping (Andrew et al. 2021) ------------------------------------------------


def test_flowers_own_adaptive_rule_moves_the_norm_away_from_its_target_and_ours_toward_it():
    # Every update is above C = 0.5 (4 of 4 clipped): C should grow toward the median norm.
    flower = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 4, initial_clipping_norm=0.5)
    flower._geometric_update(flower._noisy_fraction(4, 4))
    assert flower.clipping_norm < 0.5  # Flower 1.42: the clipped fraction in the unclipped fraction's rule
    cfg = _cfg(sigma=0.0, tau=1.0, lr=0.5)
    ours = dp_baseline.make_strategy("flower-dp-adaptive", cfg, build_problem(cfg).layout)
    ours._geometric_update(ours._noisy_fraction(4, 4))
    assert ours.clipping_norm == pytest.approx(0.5 * math.exp(0.2 * 0.5))


def test_adaptive_clipping_settles_between_the_update_norms_around_its_quantile():
    algorithm = make_algorithm("dp-fedavg-adaptive", lr=1.0, tau=1.0, target_quantile=0.5)
    messages = np.diag([1.0, 2.0, 3.0, 4.0])  # update norms 1..4
    state = algorithm.server_init(4)  # C = lr tau = 1 at first: 1 of 4 unclipped
    for _ in range(200):
        before = state["clip"][0] or 1.0
        x, state = algorithm.server_round(np.zeros(4), state, messages, 4)
    assert 2.0 <= state["clip"][0] < 3.0  # half the updates unclipped
    np.testing.assert_allclose(x, -np.minimum(np.arange(1.0, 5.0), before) / 4)  # x - mean of the clipped


def test_adaptive_clipping_under_central_dp_noises_the_sum_and_the_centred_count():
    cfg = _cfg(sigma=0.05, **{"count-stddev": 0.5})  # z = 1, m = 2: z_update = (1 - 1)^-1/2 -> refused
    with pytest.raises(ConfigError, match=r"algorithms: dp-fedavg-adaptive: count-stddev must be > z / 2 = 0.5"):
        expand_runs({**cfg, "algorithms": ["dp-fedavg-adaptive"]})
    with pytest.raises(ConfigError, match=r"algorithms: flower-dp-adaptive: count-stddev must be > z / 2"):
        expand_runs({**cfg, "algorithms": ["flower-dp-adaptive"]})
    algorithm = algorithm_from_config("dp-fedavg-adaptive", _cfg(**{"count-stddev": 1.0}))
    z_update = adaptive_noise(1.0, 1.0)
    assert z_update == pytest.approx((1 - 0.25) ** -0.5) and algorithm.hyper["update-multiplier"] == z_update
    messages = np.array([[0.1, 0.0], [0.0, 0.01]])  # C = lr tau = 0.025: the first is clipped
    draws = {0: np.array([0.3, -0.2]), 1: np.array([0.7, 0.0])}
    x, state = algorithm.server_round(np.zeros(2), algorithm.server_init(2), messages, 4, noise=lambda s=0: draws[s])
    total = np.array([0.025, 0.01]) + z_update * 0.025 * draws[0]
    np.testing.assert_allclose(x, -total / 2)
    unclipped = 0.5 + (1 - 2 / 2 + 1.0 * 0.7) / 2
    assert state["clip"][0] == pytest.approx(0.025 * math.exp(-0.2 * (unclipped - 0.5)))


# --- one simulation: the baselines, the Clip21CentralDP wrapper, an interrupted baseline resumed ---


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    from fl_clip21.flower import Clip21CentralDP
    from fl_clip21.flower.server import run_scenario

    cfg = _cfg()
    quiet = _cfg(algorithms=["clip21-sgd"], sigma=0.0, sampling="poisson", fraction=0.5, rounds=4)
    ckpt = tmp_path_factory.mktemp("ckpt") / "flower-dp-adaptive.npz"
    out: dict = {}
    app = ServerApp()

    class Stop(Exception):
        pass

    def stop(name, rec, rounds):
        if rec["round"] == 1:
            raise Stop

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        fast_polling(grid)
        out["baselines"] = (cfg, run_scenario(grid, cfg))
        problem = build_problem(quiet)
        strategy = Clip21Strategy(
            algorithm=algorithm_from_config("clip21-sgd", quiet), scenario=quiet, num_clients=4, fraction=0.5,
            sampling="poisson", seed=quiet["seed"], delta=quiet["delta"],
            evaluate=lambda params: evaluate(problem, params),
        )
        dp = Clip21CentralDP(strategy, noise_multiplier=2.0, clipping_norm=quiet["tau"])
        result = dp.start(grid, dp_baseline.R.to_record(problem.init_params()), num_rounds=4, timeout=600)
        out["wrapper"] = (quiet, dp, strategy.history, dp_baseline.R.from_record(result.arrays))
        try:
            dp_baseline.run_flower_dp(grid, cfg, "flower-dp-adaptive", stop, checkpoint=ckpt)
        except Stop:
            pass
        out["resumed"] = dp_baseline.run_flower_dp(grid, cfg, "flower-dp-adaptive", checkpoint=ckpt)

    simulate_app(app, make_client_app(), cfg)
    return out


def test_the_wrapper_gives_the_trajectory_of_the_scenario_driven_central_run(simulation):
    quiet, dp, history, params = simulation["wrapper"]
    central = {**quiet, "dp": "central", "sigma": 2.0 * quiet["tau"]}
    reference = run_local(central, "clip21-sgd")
    np.testing.assert_allclose(params["w"], reference["params"]["w"], rtol=0, atol=1e-12)
    assert [r["participants"] for r in history] == [r["participants"] for r in reference["records"]]
    assert np.abs(params["w"] - run_local(quiet, "clip21-sgd")["params"]["w"]).max() > 1e-3  # it was noised
    # The wrapper's accountant: Poisson sampling at rate 0.5, add/remove-one, multiplier 2.
    assert dp.accounted_multiplier == 2.0
    assert dp.privacy_spent() == (central_epsilon(2.0, 4, quiet["delta"], 0.5), quiet["delta"])
    assert dp.privacy_spent()[0] == reference["records"][-1]["epsilon"] == history[-1]["epsilon"]


def test_the_wrapper_refuses_what_it_cannot_honour():
    from fl_clip21.flower import Clip21CentralDP

    cfg = _cfg(algorithms=["clip21-sgd"], sigma=0.0)

    def wrap(name="clip21-sgd", scenario=cfg, **kw):
        strategy = Clip21Strategy(algorithm=algorithm_from_config(name, scenario), scenario=scenario, num_clients=4,
                                  fraction=0.5, seed=5)
        return Clip21CentralDP(strategy, **{"noise_multiplier": 1.0, "clipping_norm": 0.05, **kw})

    with pytest.raises(ValueError, match="wraps the clipping family .* got gd"):
        wrap("gd")
    with pytest.raises(ValueError, match="already adds DP noise"):
        wrap("clip-sgd", {**cfg, "sigma": 0.1, "dp": "local", "algorithms": ["clip-sgd"]})
    with pytest.raises(ValueError, match=r"clipping_norm must be the tau clip21-sgd's clients clip to, 0.05, got 0.1"):
        wrap(clipping_norm=0.1)
    with pytest.raises(ValueError, match=r"num_sampled_clients must be the strategy's round\(fraction x n\) = 2"):
        wrap(num_sampled_clients=3)
    with pytest.raises(ValueError, match="seed must be the strategy's seed 5"):
        wrap(seed=6)
    with pytest.raises(ValueError, match="secure=True with Poisson sampling needs the strategy's config secure-noise"):
        strategy = Clip21Strategy(algorithm=algorithm_from_config("clip21-sgd", cfg), scenario=cfg, num_clients=4,
                                  fraction=0.5, seed=5, sampling="poisson")
        Clip21CentralDP(strategy, noise_multiplier=1.0, clipping_norm=0.05, secure=True)
    assert wrap(num_sampled_clients=2).accounted_multiplier == 0.5  # 2 of 4, replace-one: z / 2
    secure = wrap(secure=True).strategy.algorithm
    x, state = np.zeros(31), secure.server_init(31)
    draws = [secure.server_round(x, state, np.zeros((0, 31)), 4)[0] for _ in range(2)]
    assert np.abs(draws[0] - draws[1]).max() > 0  # fresh entropy each round, no seeded stream


def test_flower_baselines_draw_secure_noise_from_os_entropy():
    cfg = _cfg(**{"secure-noise": True})
    strategy = dp_baseline.make_strategy("flower-dp-client-fixed", cfg, build_problem(cfg).layout)
    assert np.abs(strategy.server_draw(1) - strategy.server_draw(1)).max() > 0
    seeded = dp_baseline.make_strategy("flower-dp-client-fixed", _cfg(), build_problem(cfg).layout)
    np.testing.assert_array_equal(seeded.server_draw(1), seeded.server_draw(1))


def test_a_flower_baseline_resumes_from_its_checkpoint_with_the_same_trajectory(flower_runs, simulation):
    _, flower = flower_runs
    resumed = simulation["resumed"]
    assert resumed["resumed_from_round"] == 1
    assert [r["round"] for r in resumed["records"]] == [1, 2, 3]
    for key, arr in flower["flower-dp-adaptive"]["params"].items():
        np.testing.assert_array_equal(resumed["params"][key], arr)
    assert [r["epsilon"] for r in resumed["records"]] == [r["epsilon"] for r in flower["flower-dp-adaptive"]["records"]]


@pytest.mark.parametrize("name", ["dp-fedavg", "dp-fedavg-adaptive"])
def test_tune_runs_dp_fedavg_batched_each_cell_as_it_runs_alone(name):
    # fl-clip21 tune's cells (fl_clip21.cells): 3 cells differing in lr, tau and sigma, central DP.
    cells = [_cfg(algorithms=[name], rounds=4, lr=lr, tau=tau, sigma=sigma, **{"num-clients": 8, "count-stddev": 2.0})
             for lr, tau, sigma in ((0.5, 0.05, 0.05), (1.0, 0.2, 0.1), (0.3, 0.01, 0.02))]
    from fl_clip21.cells import run_cells

    for cfg, res in zip(cells, run_cells(cells, name)):
        alone = run_local(cfg, name)
        np.testing.assert_allclose(res["params"]["w"], alone["params"]["w"], rtol=0, atol=1e-12)
        assert [r["epsilon"] for r in res["records"]] == [r["epsilon"] for r in alone["records"]]
