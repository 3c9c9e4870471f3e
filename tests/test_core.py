"""Core maths (clipping, Top-k, error feedback) and the algorithm update rules.

The reference for every expected value is docs/algorithms.md.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
from dict_algorithm import apply_rows, clip, client_init, client_update, ef_step, server_init, server_update
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_clip21 import algorithms, config, core, problems

# --- strategies ----------------------------------------------------------------

_ELEMENTS = st.floats(
    min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64
)
# Shapes include 0-d arrays (min_dims=0) and empty arrays (min_side=0).
_ARRAY = hnp.arrays(
    dtype=np.float64,
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    elements=_ELEMENTS,
)
_KEYS = st.sampled_from(["w", "b", "layer.0.weight", "layer.0.bias", "scale", "x"])
PARAMS = st.dictionaries(_KEYS, _ARRAY, min_size=1, max_size=5)
TAU = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _norm(params) -> float:
    """Independent global L2 norm (not core.global_norm)."""
    flat = np.concatenate([np.ravel(v).astype(np.float64) for v in params.values()] + [np.zeros(0)])
    return float(np.linalg.norm(flat))


def _deep_copy(params):
    return {k: np.array(v, copy=True) for k, v in params.items()}


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert np.shape(a[k]) == np.shape(b[k]), k
        np.testing.assert_array_equal(a[k], b[k])


# --- clip_by_global_norm: properties --------------------------------------------


@SETTINGS
@given(PARAMS, TAU)
def test_clip_norm_is_at_most_tau(y, tau):
    out, _ = clip(y, tau)
    assert _norm(out) <= tau * (1 + 1e-12)


@SETTINGS
@given(PARAMS, TAU)
def test_clip_keeps_keys_shapes_dtypes(y, tau):
    out, _ = clip(y, tau)
    assert set(out) == set(y)
    for k in y:
        assert isinstance(out[k], np.ndarray), k
        assert out[k].shape == y[k].shape, k
        assert out[k].dtype == y[k].dtype, k


@SETTINGS
@given(PARAMS, TAU)
def test_clip_is_idempotent(y, tau):
    once, _ = clip(y, tau)
    twice, _ = clip(once, tau)
    assert set(once) == set(twice)
    for k in once:
        np.testing.assert_allclose(twice[k], once[k], rtol=1e-12, atol=1e-300)


@SETTINGS
@given(PARAMS, TAU)
def test_clip_active_flag_matches_norm(y, tau):
    _, active = clip(y, tau)
    assert active == (_norm(y) > tau) or math.isclose(_norm(y), tau, rel_tol=1e-12)


@SETTINGS
@given(st.dictionaries(_KEYS, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), min_size=1, max_size=5), TAU)
def test_clip_of_zero_is_zero_without_warnings(shapes, tau):
    y = {k: np.zeros(s) for k, s in shapes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            out, active = clip(y, tau)
    assert active is False
    _assert_same(out, y)
    for k in y:
        assert not np.any(out[k])


@SETTINGS
@given(PARAMS, st.floats(min_value=1.0, max_value=10.0), st.floats(min_value=1e-6, max_value=10.0))
def test_clip_inactive_returns_input_unchanged(y, factor, extra):
    tau = _norm(y) * factor + extra  # tau >= ||y||, and tau > 0
    out, active = clip(y, tau)
    assert active is False
    _assert_same(out, y)


@SETTINGS
@given(PARAMS, st.floats(min_value=0.01, max_value=0.99))
def test_clip_active_has_norm_tau_and_keeps_direction(y, frac):
    norm = _norm(y)
    assume(norm > 1e-3)
    tau = frac * norm  # strictly below ||y||: clipping must be active
    out, active = clip(y, tau)
    assert active is True
    assert math.isclose(_norm(out), tau, rel_tol=1e-9)
    # Same direction: out is a positive multiple (tau / ||y||) of y, key by key.
    for k in y:
        np.testing.assert_allclose(out[k], y[k] * (tau / norm), rtol=1e-12, atol=1e-12 * tau)
    flat_in = np.concatenate([np.ravel(y[k]) for k in y])
    flat_out = np.concatenate([np.ravel(out[k]) for k in y])
    cos = float(flat_in @ flat_out) / (norm * _norm(out))
    assert cos == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(PARAMS, TAU)
def test_clip_does_not_modify_input_and_returns_new_arrays(y, tau):
    before = _deep_copy(y)
    ids = {k: id(v) for k, v in y.items()}
    out, _ = clip(y, tau)
    # inputs untouched
    assert {k: id(v) for k, v in y.items()} == ids
    _assert_same(y, before)
    # outputs are new objects that share no memory with the inputs
    assert out is not y
    for k in y:
        assert out[k] is not y[k], k
        assert not np.shares_memory(out[k], y[k]), k
    # writing into the output does not reach the input
    for k in out:
        if out[k].size:
            out[k][...] = 12345.0
    _assert_same(y, before)


@pytest.mark.parametrize("tau", [0, 0.0, -1, -0.5, float("nan")])
def test_clip_nonpositive_tau_raises(tau):
    y = {"x": np.array([3.0, 4.0])}
    with pytest.raises(ValueError) as ei:
        clip(y, tau)
    msg = str(ei.value)
    assert "tau" in msg
    assert repr(tau) in msg


@pytest.mark.parametrize("tau", [0, -2.5])
def test_clip_operator_nonpositive_tau_raises(tau):
    with pytest.raises(ValueError) as ei:
        core.clip_rows(tau)
    assert "tau" in str(ei.value) and repr(tau) in str(ei.value)


def test_clip_small_example():
    # ||(3, 4), 12|| = sqrt(9 + 16 + 144) = 13; tau = 2.6 -> factor 0.2
    y = {"a": np.array([3.0, 4.0]), "b": np.array(12.0)}
    out, active = clip(y, 2.6)
    assert active is True
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-14)
    np.testing.assert_allclose(out["b"], 2.4, rtol=1e-14)
    assert out["b"].shape == ()


# --- Top-k -----------------------------------------------------------------------


def _distinct_model(seed: int) -> dict[str, np.ndarray]:
    """A model of 3 arrays (one 0-d) whose 1 + 6 + 8 = 15 entries have distinct magnitudes."""
    rng = np.random.default_rng(seed)
    mags = rng.permutation(np.arange(1, 16, dtype=np.float64))
    signs = rng.choice([-1.0, 1.0], size=15)
    flat = mags * signs
    return {"s": np.array(flat[0]), "m": flat[1:7].reshape(2, 3), "v": flat[7:15].copy()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 5, 9, 14])
def test_topk_keeps_exactly_k_largest_over_whole_model(seed, k):
    y = _distinct_model(seed)
    before = _deep_copy(y)
    out, active = apply_rows(core.topk_rows(k), y)
    _assert_same(y, before)  # input untouched
    flat_in = np.concatenate([np.ravel(y[n]) for n in y])
    flat_out = np.concatenate([np.ravel(out[n]) for n in y])
    assert [np.shape(out[n]) for n in y] == [np.shape(y[n]) for n in y]
    # exactly k non-zero entries ...
    assert np.count_nonzero(flat_out) == k
    # ... which are the k largest magnitudes, with their original values
    expected_keep = set(np.argsort(-np.abs(flat_in))[:k].tolist())
    assert set(np.flatnonzero(flat_out).tolist()) == expected_keep
    np.testing.assert_array_equal(flat_out[list(expected_keep)], flat_in[list(expected_keep)])
    assert active is True  # non-zero entries were dropped
    for n in y:
        assert out[n] is not y[n]


@pytest.mark.parametrize("k", [15, 16, 1000])
def test_topk_k_at_least_size_returns_identical_arrays(k):
    y = _distinct_model(3)
    out, active = apply_rows(core.topk_rows(k), y)
    assert active is False
    _assert_same(out, y)
    for n in y:
        assert not np.shares_memory(out[n], y[n])


def test_topk_drops_only_zeros_is_not_active():
    y = {"a": np.array([0.0, 5.0, 0.0]), "b": np.array([[0.0, -7.0]])}
    out, active = apply_rows(core.topk_rows(2), y)
    assert active is False
    _assert_same(out, y)


@pytest.mark.parametrize("k", [0, -1, -10])
def test_topk_k_below_one_raises(k):
    with pytest.raises(ValueError) as ei:
        core.topk_rows(k)
    assert "topk" in str(ei.value)
    assert repr(k) in str(ei.value)


# --- error feedback step -----------------------------------------------------------


@pytest.mark.parametrize("step", [1.0, 0.5])
def test_error_feedback_step_with_clip(step):
    target = {"a": np.array([4.0, 1.0]), "b": np.array(-2.0)}
    memory = {"a": np.array([1.0, -3.0]), "b": np.array(10.0)}
    t0, m0 = _deep_copy(target), _deep_copy(memory)
    # target - memory = (3, 4), -12; norm = sqrt(9 + 16 + 144) = 13
    # tau = 6.5 -> factor 0.5 -> c = (1.5, 2), -6
    res = ef_step(target, memory, core.clip_rows(6.5), step)
    np.testing.assert_allclose(res.increment["a"], [1.5, 2.0], rtol=1e-14)
    np.testing.assert_allclose(res.increment["b"], -6.0, rtol=1e-14)
    # memory + step * c
    np.testing.assert_allclose(res.memory["a"], [1.0 + step * 1.5, -3.0 + step * 2.0], rtol=1e-14)
    np.testing.assert_allclose(res.memory["b"], 10.0 - step * 6.0, rtol=1e-14)
    assert res.active is True
    _assert_same(target, t0)
    _assert_same(memory, m0)
    for k in memory:
        assert res.memory[k] is not memory[k]
        assert not np.shares_memory(res.memory[k], memory[k])


def test_error_feedback_step_with_topk():
    target = {"a": np.array([1.0, 2.0, 3.0])}
    memory = {"a": np.array([2.0, 2.5, -1.0])}
    t0, m0 = _deep_copy(target), _deep_copy(memory)
    # target - memory = (-1, -0.5, 4); top-2 -> (-1, 0, 4)
    res = ef_step(target, memory, core.topk_rows(2), 0.25)
    np.testing.assert_array_equal(res.increment["a"], [-1.0, 0.0, 4.0])
    # memory + 0.25 * c = (2 - 0.25, 2.5, -1 + 1)
    np.testing.assert_allclose(res.memory["a"], [1.75, 2.5, 0.0], rtol=1e-14)
    assert res.active is True
    _assert_same(target, t0)
    _assert_same(memory, m0)


def test_error_feedback_step_inactive_clip_reaches_target():
    target = {"x": np.array([0.3, -0.4])}
    memory = {"x": np.array([0.0, 0.0])}
    res = ef_step(target, memory, core.clip_rows(1.0))
    assert res.active is False
    np.testing.assert_array_equal(res.increment["x"], [0.3, -0.4])
    np.testing.assert_array_equal(res.memory["x"], [0.3, -0.4])


# --- a loop that drives an Algorithm directly -------------------------------------


def run_rounds(alg, grad_fns, x0, rounds, seed=0):
    """Drive ``alg`` for ``rounds`` rounds with full participation.

    Returns the list of models after each round and, after each round, the
    server state and a copy of every client state.
    """
    rng = np.random.default_rng(seed)
    x = _deep_copy(x0)
    server = server_init(alg, x)
    clients = [client_init(alg, x) for _ in grad_fns]
    xs, servers, client_states, flags = [], [], [], []
    for _ in range(rounds):
        messages, round_flags = [], []
        for i, grad_fn in enumerate(grad_fns):
            res = client_update(alg, x, clients[i], grad_fn, rng)
            clients[i] = res.state
            messages.append(res.message)
            round_flags.append(res.clipped)
        x, server = server_update(alg, x, server, messages, len(grad_fns))
        xs.append(x)
        servers.append(server)
        client_states.append(copy.deepcopy(clients))
        flags.append(round_flags)
    return xs, servers, client_states, flags


def mean_estimation_grads(centers):
    """grad f_i(x) = x - a_i for f_i(x) = 0.5 ||x - a_i||^2."""
    return [
        (lambda params, rng, a=np.asarray(a, dtype=np.float64): {"x": params["x"] - a})
        for a in centers
    ]


def problem_grads(problem):
    return [
        (lambda params, rng, i=i: problem.client_grad(i, params))
        for i in range(problem.num_clients)
    ]


# --- Clip21-GD by hand --------------------------------------------------------------


def test_clip21_gd_two_clients_two_rounds_by_hand():
    # f_1(x) = 0.5||x - a_1||^2, a_1 = (3, 4); f_2(x) = 0.5||x - a_2||^2, a_2 = (0, -1)
    # x^0 = (0, 0), tau = 1, lr = 0.5, v_1 = v_2 = 0, g = 0.
    alg = algorithms.make_algorithm("clip21-gd", lr=0.5, tau=1.0)
    grads = mean_estimation_grads([(3.0, 4.0), (0.0, -1.0)])
    x0 = {"x": np.array([0.0, 0.0])}
    rng = np.random.default_rng(0)
    n = 2

    x = x0
    server = server_init(alg, x)
    c_states = [client_init(alg, x), client_init(alg, x)]
    np.testing.assert_array_equal(server["g"]["x"], [0.0, 0.0])
    np.testing.assert_array_equal(c_states[0]["v"]["x"], [0.0, 0.0])

    # ---- round 1 -------------------------------------------------------------
    # client 1: grad_1 = x - a_1 = (-3, -4); grad_1 - v_1 = (-3, -4), norm 5 > 1
    #           c_1 = (-3, -4) / 5 = (-0.6, -0.8); v_1 = (-0.6, -0.8)
    # client 2: grad_2 = x - a_2 = (0, 1); grad_2 - v_2 = (0, 1), norm 1 <= 1 (not clipped)
    #           c_2 = (0, 1); v_2 = (0, 1)
    # server:   g = 0 + (c_1 + c_2) / 2 = (-0.3, 0.1)
    #           x^1 = x^0 - 0.5 g = (0.15, -0.05)
    r1 = client_update(alg, x, c_states[0], grads[0], rng)
    r2 = client_update(alg, x, c_states[1], grads[1], rng)
    np.testing.assert_allclose(r1.message["x"], [-0.6, -0.8], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r2.message["x"], [0.0, 1.0], rtol=0, atol=1e-15)
    assert (r1.clipped, r2.clipped) == (True, False)
    np.testing.assert_allclose(r1.state["v"]["x"], [-0.6, -0.8], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r2.state["v"]["x"], [0.0, 1.0], rtol=0, atol=1e-15)
    c_states = [r1.state, r2.state]
    x, server = server_update(alg, x, server, [r1.message, r2.message], n)
    np.testing.assert_allclose(server["g"]["x"], [-0.3, 0.1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(x["x"], [0.15, -0.05], rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        server["g"]["x"], (c_states[0]["v"]["x"] + c_states[1]["v"]["x"]) / 2, rtol=0, atol=1e-15
    )
    np.testing.assert_array_equal(x0["x"], [0.0, 0.0])  # the old model was not changed in place

    # ---- round 2 -------------------------------------------------------------
    # client 1: grad_1 = x^1 - a_1 = (0.15 - 3, -0.05 - 4) = (-2.85, -4.05)
    #           grad_1 - v_1 = (-2.85 + 0.6, -4.05 + 0.8) = (-2.25, -3.25)
    #           norm = sqrt(2.25^2 + 3.25^2) = sqrt(5.0625 + 10.5625) = sqrt(15.625)
    #                = 2.5 sqrt(2.5) = 3.952847075210474 > 1
    #           c_1 = (-2.25, -3.25) / (2.5 sqrt(2.5)) = (-0.9, -1.3) / sqrt(2.5)
    #               = (-0.9, -1.3) * sqrt(0.4),  sqrt(0.4) = 0.6324555320336759
    #               = (-0.5692099788303083, -0.8221921916437787)
    #           v_1 = (-0.6, -0.8) + c_1 = (-1.1692099788303083, -1.6221921916437787)
    # client 2: grad_2 = x^1 - a_2 = (0.15, 0.95); grad_2 - v_2 = (0.15, -0.05)
    #           norm = sqrt(0.0225 + 0.0025) = sqrt(0.025) ~ 0.158 <= 1 (not clipped)
    #           c_2 = (0.15, -0.05); v_2 = (0.15, 0.95)
    # server:   g = (-0.3, 0.1) + (c_1 + c_2) / 2
    #             = (-0.3 + (-0.5692099788303083 + 0.15) / 2, 0.1 + (-0.8221921916437787 - 0.05) / 2)
    #             = (-0.3 - 0.20960498941515415, 0.1 - 0.43609609582188935)
    #             = (-0.5096049894151542, -0.3360960958218894)
    #           mean(v) = ((-1.1692099788303083 + 0.15) / 2, (-1.6221921916437787 + 0.95) / 2) = g
    #           x^2 = x^1 - 0.5 g = (0.15 + 0.2548024947075771, -0.05 + 0.1680480479109447)
    #               = (0.4048024947075771, 0.11804804791094468)
    r1 = client_update(alg, x, c_states[0], grads[0], rng)
    r2 = client_update(alg, x, c_states[1], grads[1], rng)
    np.testing.assert_allclose(r1.message["x"], [-0.5692099788303083, -0.8221921916437787], rtol=0, atol=1e-14)
    np.testing.assert_allclose(r2.message["x"], [0.15, -0.05], rtol=0, atol=1e-14)
    assert (r1.clipped, r2.clipped) == (True, False)
    np.testing.assert_allclose(r1.state["v"]["x"], [-1.1692099788303083, -1.6221921916437787], rtol=0, atol=1e-14)
    np.testing.assert_allclose(r2.state["v"]["x"], [0.15, 0.95], rtol=0, atol=1e-14)
    c_states = [r1.state, r2.state]
    x, server = server_update(alg, x, server, [r1.message, r2.message], n)
    np.testing.assert_allclose(server["g"]["x"], [-0.5096049894151542, -0.3360960958218894], rtol=0, atol=1e-14)
    np.testing.assert_allclose(x["x"], [0.4048024947075771, 0.11804804791094468], rtol=0, atol=1e-14)
    np.testing.assert_allclose(
        server["g"]["x"], (c_states[0]["v"]["x"] + c_states[1]["v"]["x"]) / 2, rtol=0, atol=1e-14
    )
    # every message respects the bound the server enforces
    bound = alg.message_bound(2) if callable(alg.message_bound) else alg.message_bound  # d = 2 entries
    assert bound == 1.0
    assert np.linalg.norm(r1.message["x"]) <= 1.0 + 1e-12


# --- Clip21 with a huge tau is GD ---------------------------------------------------


def _assert_same_iterates(xs_a, xs_b, rtol=1e-10, atol=1e-12):
    assert len(xs_a) == len(xs_b)
    for k, (a, b) in enumerate(zip(xs_a, xs_b)):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=f"round {k + 1}, {name}")


def _assert_invariant(servers, client_states, atol=1e-10):
    """g == (1/n) sum_i v_i after every round."""
    for k, (s, cs) in enumerate(zip(servers, client_states)):
        for name in s["g"]:
            mean_v = np.mean([c["v"][name] for c in cs], axis=0)
            np.testing.assert_allclose(s["g"][name], mean_v, rtol=1e-10, atol=atol, err_msg=f"round {k + 1}")


def test_clip21_with_huge_tau_is_gd_on_mean_estimation():
    rng = np.random.default_rng(7)
    centers = rng.normal(0.0, 3.0, size=(5, 4))
    x0 = {"x": rng.normal(size=4)}
    grads = mean_estimation_grads(centers)
    gd = algorithms.make_algorithm("gd", lr=0.3)
    c21 = algorithms.make_algorithm("clip21-gd", lr=0.3, tau=1e9)
    xs_gd, *_ = run_rounds(gd, grads, x0, 30)
    xs_c21, servers, clients, flags = run_rounds(c21, grads, x0, 30)
    _assert_same_iterates(xs_gd, xs_c21)
    assert not any(any(f) for f in flags)
    _assert_invariant(servers, clients)
    # and GD itself moved towards the mean (the test is not vacuous)
    assert np.linalg.norm(xs_gd[-1]["x"] - centers.mean(axis=0)) < 1e-3 * np.linalg.norm(x0["x"] - centers.mean(axis=0))


def test_clip21_with_huge_tau_is_gd_on_logreg():
    cfg = config.resolve(
        {
            "num-clients": 10,
            "seed": 0,
            "lr": 1.0,
            "problem": {"name": "logreg", "dataset": "breast_cancer"},
            "partition": {"kind": "iid"},
        }
    )
    problem = problems.build_problem(cfg)
    assert problem.num_clients == 10
    grads = problem_grads(problem)
    x0 = problem.init_params()
    gd = algorithms.make_algorithm("gd", lr=cfg["lr"])
    c21 = algorithms.make_algorithm("clip21-gd", lr=cfg["lr"], tau=1e9)
    xs_gd, *_ = run_rounds(gd, grads, x0, 30)
    xs_c21, servers, clients, flags = run_rounds(c21, grads, x0, 30)
    _assert_same_iterates(xs_gd, xs_c21)
    assert not any(any(f) for f in flags)
    _assert_invariant(servers, clients)
    assert problem.loss(xs_gd[-1]) < problem.loss(x0)


# --- the docs/algorithms.md example: Clip-GD stalls, Clip21-GD does not ------------------


def test_clip_gd_stalls_and_clip21_reaches_the_mean():
    centers = [[-1.0], [-1.0], [10.0]]
    grads = mean_estimation_grads(centers)
    x0 = {"x": np.zeros(1)}
    clip_gd = algorithms.make_algorithm("clip-gd", lr=0.5, tau=1.0)
    c21 = algorithms.make_algorithm("clip21-gd", lr=0.5, tau=1.0)
    xs_clip, *_ = run_rounds(clip_gd, grads, x0, 200)
    xs_c21, servers, clients, _ = run_rounds(c21, grads, x0, 200)
    assert xs_clip[-1]["x"][0] == pytest.approx(-0.5, abs=1e-8)
    assert xs_c21[-1]["x"][0] == pytest.approx(8.0 / 3.0, abs=1e-8)
    _assert_invariant(servers, clients)


def test_clip_gd_messages_are_clipped_gradients():
    alg = algorithms.make_algorithm("clip-gd", lr=0.5, tau=1.0)
    grads = mean_estimation_grads([[10.0, 0.0]])
    x = {"x": np.array([0.0, 0.0])}
    res = client_update(alg, x, client_init(alg, x), grads[0], np.random.default_rng(0))
    # grad = (-10, 0) -> clip_1 = (-1, 0)
    np.testing.assert_allclose(res.message["x"], [-1.0, 0.0], rtol=1e-15)
    assert res.clipped is True


# --- server-side clipping -----------------------------------------------------------


def test_server_clip_gd_step_is_at_most_lr_tau():
    rng = np.random.default_rng(3)
    centers = rng.normal(0.0, 50.0, size=(4, 3))
    grads = mean_estimation_grads(centers)
    lr, tau = 0.2, 0.7
    alg = algorithms.make_algorithm("server-clip-gd", lr=lr, tau=tau)
    x0 = {"x": np.zeros(3)}
    xs, *_ = run_rounds(alg, grads, x0, 20)
    prev = x0
    steps = []
    for x in xs:
        step = np.linalg.norm(x["x"] - prev["x"])
        assert step <= lr * tau * (1 + 1e-12)
        steps.append(step)
        prev = x
    # the mean is far away, so clipping is active and the step is exactly lr * tau
    assert steps[0] == pytest.approx(lr * tau, rel=1e-12)
    # and the direction is that of the mean gradient: (1/n) sum (x - a_i) = x - mean(a)
    direction = xs[0]["x"] - x0["x"]
    expected = -(x0["x"] - centers.mean(axis=0))
    cos = direction @ expected / (np.linalg.norm(direction) * np.linalg.norm(expected))
    assert cos == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", ["clip-gd", "server-clip-gd", "clip21-gd", "clip21-sgd", "clip-sgd"])
@pytest.mark.parametrize("bad", [0, -1.0])
def test_make_algorithm_rejects_bad_tau(name, bad):
    with pytest.raises(ValueError) as ei:
        algorithms.make_algorithm(name, lr=0.1, tau=bad)
    assert "tau" in str(ei.value) and repr(bad) in str(ei.value)


def test_make_algorithm_unknown_name():
    with pytest.raises(ValueError) as ei:
        algorithms.make_algorithm("nope", lr=0.1, tau=1.0)
    assert "nope" in str(ei.value)


def _hyper(name: str) -> dict[str, object]:
    """Valid keywords for every hyper-parameter ``name`` takes."""
    values = {"lr": 0.1, "tau": 1.0, "sigma": 0.0, "beta1": 0.9, "beta2": 0.5, "topk": 2, "local-steps": 2,
              "message-norm-cap": 7.0, "target-quantile": 0.5, "clip-lr": 0.2, "count-stddev": 0.0}
    return {k.replace("-", "_"): values[k] for k in algorithms.HYPER_KEYS[name]}


@pytest.mark.parametrize("name", list(algorithms.ALGORITHMS))
def test_make_algorithm_rejects_a_misspelled_hyper_parameter(name):
    with pytest.raises(ValueError) as ei:
        algorithms.make_algorithm(name, **_hyper(name), tua=1.0)
    assert "'tua'" in str(ei.value) and name in str(ei.value) and "1.0" in str(ei.value)


@pytest.mark.parametrize(
    "name,key", [("gd", "tau"), ("clip21-gd", "sigma"), ("ef21-topk", "tau"), ("clip21-gd", "message_norm_cap")]
)
def test_make_algorithm_rejects_a_hyper_parameter_the_algorithm_does_not_use(name, key):
    with pytest.raises(ValueError) as ei:
        algorithms.make_algorithm(name, **_hyper(name), **{key: 1.0})
    assert repr(key) in str(ei.value) and name in str(ei.value)


def test_every_algorithm_takes_exactly_the_keys_of_its_table():
    assert set(algorithms.HYPER_KEYS) == set(algorithms.ALGORITHMS)
    for name in algorithms.ALGORITHMS:
        assert set(algorithms.HYPER_KEYS[name]) <= set(config.SCHEMA), name
        alg = algorithms.make_algorithm(name, **_hyper(name))
        assert alg.name == name
        assert set(alg.hyper) <= set(algorithms.HYPER_KEYS[name]), name


def test_algorithm_from_config_gives_each_algorithm_only_its_keys():
    cfg = config.resolve({"lr": 0.3, "tau": 0.2, "topk": 3, "message-norm-cap": 50.0, "local-steps": 2})
    for name in algorithms.ALGORITHMS:
        alg = algorithms.algorithm_from_config(name, cfg)
        assert alg.name == name  # ef21-topk is not turned into clip21-topk by the scenario's tau
        assert {k: cfg[k] for k in alg.hyper} == dict(alg.hyper), name


@pytest.mark.parametrize("name", list(algorithms.ALGORITHMS))
def test_every_algorithm_has_a_finite_message_bound(name):
    alg = algorithms.algorithm_from_config(name, config.resolve({"sigma": 0.5, "topk": 2, "algorithms": ["clip-gd"]}))
    assert alg.message_bound is not None
    for d in (1, 10**6):
        assert 0 < alg.message_bound(d) < math.inf


@pytest.mark.parametrize("name", ["gd", "sgd", "server-clip-gd", "ef21-topk"])
def test_message_norm_cap_is_the_bound_of_the_algorithms_that_do_not_clip(name):
    default = algorithms.algorithm_from_config(name, config.resolve({}))
    capped = algorithms.algorithm_from_config(name, config.resolve({"message-norm-cap": 5.0}))
    assert default.message_bound(100) == algorithms.MESSAGE_NORM_CAP == config.SCHEMA["message-norm-cap"].default
    assert capped.message_bound(100) == 5.0 and capped.hyper["message-norm-cap"] == 5.0


@pytest.mark.parametrize("name", ["clip-gd", "clip21-gd", "clip21-sgd2m", "clip21-topk", "celgc"])
def test_clipping_algorithms_keep_their_own_bound(name):
    alg = algorithms.algorithm_from_config(name, config.resolve({"tau": 0.25, "message-norm-cap": 1e9, "topk": 2}))
    assert alg.message_bound(4) <= 0.25  # tau (celgc: local-steps * lr * tau), not the cap of 1e9
    assert "message-norm-cap" not in alg.hyper


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, True])
def test_message_norm_cap_must_be_a_positive_finite_number(bad):
    with pytest.raises(ValueError) as ei:
        algorithms.make_algorithm("gd", lr=0.1, message_norm_cap=bad)
    assert "message-norm-cap" in str(ei.value) and repr(bad) in str(ei.value)


def test_the_server_rejects_a_huge_gd_message():
    from fl_clip21.flower import records as R
    from fl_clip21.flower import validation as V

    alg = algorithms.make_algorithm("gd", lr=0.1)
    model = {"x": np.zeros(2)}
    bound = alg.message_bound(2)
    with pytest.raises(V.ReplyError, match="exceeds the bound 1e"):
        V.check_values(V.decode_arrays(R.to_record({"x": np.array([1e308, 1e308])}), model), bound)
    V.check_values(V.decode_arrays(R.to_record({"x": np.array([3.0, 4.0])}), model), bound)


# --- partial participation: the server still divides by n ---------------------------


def test_clip21_server_divides_by_all_clients():
    alg = algorithms.make_algorithm("clip21-gd", lr=0.5, tau=1.0)
    x = {"x": np.array([1.0, 1.0])}
    state = server_init(alg, x)
    # one reply out of n = 4 clients: g = 0 + (0.4, -0.8) / 4 = (0.1, -0.2)
    # x = (1, 1) - 0.5 (0.1, -0.2) = (0.95, 1.1)
    x_new, state = server_update(alg, x, state, [{"x": np.array([0.4, -0.8])}], 4)
    np.testing.assert_allclose(state["g"]["x"], [0.1, -0.2], rtol=1e-15)
    np.testing.assert_allclose(x_new["x"], [0.95, 1.1], rtol=1e-15)
    # no reply at all: g is kept and the model still moves by -lr g
    x_next, state = server_update(alg, x_new, state, [], 4)
    np.testing.assert_allclose(state["g"]["x"], [0.1, -0.2], rtol=1e-15)
    np.testing.assert_allclose(x_next["x"], [0.9, 1.2], rtol=1e-15)


def test_clip21_invariant_with_partial_participation():
    rng = np.random.default_rng(11)
    centers = rng.normal(0.0, 5.0, size=(6, 3))
    grads = mean_estimation_grads(centers)
    n = len(grads)
    alg = algorithms.make_algorithm("clip21-gd", lr=0.4, tau=0.5)
    x = {"x": np.zeros(3)}
    server = server_init(alg, x)
    clients = [client_init(alg, x) for _ in range(n)]
    for _ in range(40):
        sampled = rng.choice(n, size=3, replace=False)
        msgs = []
        for i in sampled:
            res = client_update(alg, x, clients[i], grads[i], rng)
            assert np.linalg.norm(res.message["x"]) <= 0.5 * (1 + 1e-12)
            clients[i] = res.state
            msgs.append(res.message)
        x, server = server_update(alg, x, server, msgs, n)
        mean_v = np.mean([c["v"]["x"] for c in clients], axis=0)
        np.testing.assert_allclose(server["g"]["x"], mean_v, rtol=1e-12, atol=1e-12)
