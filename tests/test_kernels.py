"""The compiled loops (fl_clip21.kernels) against the numpy code they replace.

The error-feedback step with a clip equals numpy's to float rounding (a
row's sum of squares is summed in another order) whatever the rows hold:
zeros, NaN, inf, magnitudes whose squares overflow or underflow; the CSR
product equals scipy's bit for bit; a whole run agrees with and without them.
"""

from __future__ import annotations


from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fl_clip21 import backend, core, kernels
from fl_clip21.config import resolve
from fl_clip21.engine import run_local

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed (the 'fast' extra)")

HOSTILE = st.one_of(
    st.floats(-10, 10, width=64),
    st.sampled_from([0.0, -0.0, 1e300, -1e300, 1e-300, 5e-324, np.inf, -np.inf, np.nan, 1e154, 1e-160]),
)


compiled = kernels.switched


def _step(target, memory, tau, step, overwrite):
    t, v = target.copy(), memory.copy()
    out = core.ef_step_rows(t, v, core.clip_rows(tau), step, overwrite_target=overwrite, overwrite_memory=overwrite)
    if overwrite:  # the buffers were written in place
        assert out.increment is t and out.memory is v
    return out


def _same(a, b, dtype):
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=0, equal_nan=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 40)),
    dtype=st.sampled_from([np.float64, np.float32]),
    data=st.data(),
    per_row_tau=st.booleans(),
    step_kind=st.sampled_from(["one", "scalar", "rows"]),
    overwrite=st.booleans(),
)
def test_the_compiled_clip_step_is_numpys(shape, dtype, data, per_row_tau, step_kind, overwrite):
    with np.errstate(over="ignore"):
        target = data.draw(arrays(np.float64, shape, elements=HOSTILE)).astype(dtype)
        memory = data.draw(arrays(np.float64, shape, elements=st.floats(-10, 10, width=64))).astype(dtype)
    m = shape[0]
    tau = (data.draw(arrays(np.float64, m, elements=st.floats(1e-3, 1e3))) if per_row_tau
           else data.draw(st.floats(1e-3, 1e3)))
    step = {"one": 1.0, "scalar": 0.5, "rows": np.linspace(0.1, 1.0, m)}[step_kind]
    with np.errstate(all="ignore"):
        with compiled(True):
            assert kernels.usable(target, memory)
            fast = _step(target, memory, tau, step, overwrite)
        with compiled(False):
            slow = _step(target, memory, tau, step, overwrite)
    np.testing.assert_array_equal(fast.active, slow.active)
    _same(fast.target_norms, slow.target_norms, np.float64)
    _same(fast.input_norms, slow.input_norms, np.float64)
    _same(fast.increment, slow.increment, dtype)
    _same(fast.memory, slow.memory, dtype)
    assert fast.increment.dtype == slow.increment.dtype == dtype
    assert fast.memory.dtype == dtype


def test_a_clipped_row_has_norm_tau_and_a_zero_row_stays_zero():
    target = np.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4], [1e200, 1e200]])
    step = core.ef_step_rows(target, np.zeros_like(target), core.clip_rows(1.0))
    np.testing.assert_allclose(step.increment[:3], [[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]])
    np.testing.assert_allclose(core.row_norms(step.increment[3:]), [1.0])
    np.testing.assert_array_equal(step.active, [True, False, False, True])
    np.testing.assert_allclose(step.input_norms, [5.0, 0.0, 0.5, np.sqrt(2) * 1e200])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=8),
    d=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_compiled_row_sums_are_scipys_bit_for_bit(sizes, d, seed):
    rng = np.random.default_rng(seed)
    counts = np.array(sizes, dtype=np.int64)
    X = rng.standard_normal((max(1, int(counts.sum()) + 2), d))
    rows = rng.integers(0, X.shape[0], size=int(counts.sum()))
    values = rng.standard_normal(rows.size)
    sums = backend.NUMPY.row_sums(rows, counts, X.shape[0])
    with compiled(True):
        fast = sums(values, X)
    with compiled(False):
        slow = sums(values, X)
    assert fast.shape == slow.shape == (len(sizes), d)
    np.testing.assert_array_equal(fast, slow)
    with compiled(True):
        again, total = sums(values, X, with_total=True)
    with compiled(False):
        _, slow_total = sums(values, X, with_total=True)
    np.testing.assert_array_equal(again, fast)
    np.testing.assert_allclose(total, slow_total, rtol=1e-12, atol=1e-12)


def test_row_sums_refuse_rows_outside_the_data():
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\)"):
        backend.NUMPY.row_sums(np.array([0, 3]), np.array([2]), 3)


@pytest.mark.parametrize("algorithm", ["clip21-gd", "clip21-sgd2m", "clip-gd"])
def test_a_run_is_the_same_with_and_without_the_compiled_loops(algorithm):
    cfg = resolve({
        "algorithms": [algorithm], "rounds": 30, "lr": 0.5, "tau": 0.05, "num-clients": 20, "seed": 3,
        "beta1": 0.5, "beta2": 0.5,
        "problem": {"name": "logreg", "dataset": "synthetic", "rows": 400, "features": 20},
        "partition": {"kind": "dirichlet", "alpha": 1.0},
    })
    with compiled(True):
        fast = run_local(cfg, algorithm)
    with compiled(False):
        slow = run_local(cfg, algorithm)
    np.testing.assert_allclose(fast["params"]["w"], slow["params"]["w"], rtol=1e-11, atol=1e-14)
    for a, b in zip(fast["records"], slow["records"]):
        assert a["clip_fraction"] == b["clip_fraction"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-11)
    assert max(r["clip_fraction"] for r in fast["records"]) > 0  # the clip did work


@pytest.mark.parametrize("client_grads", [True, False])
def test_the_compiled_logreg_evaluation_is_numpys(client_grads):
    from fl_clip21.problems import build_problem

    cfg = resolve({
        "algorithms": ["clip21-gd"], "num-clients": 7, "seed": 1,
        "problem": {"name": "logreg", "dataset": "synthetic", "rows": 300, "features": 12, "reg": 0.1},
        "partition": {"kind": "dirichlet", "alpha": 1.0},
    })
    problem = build_problem(cfg)
    with compiled(True):
        assert kernels.ENABLED and kernels.usable(problem.X, np.zeros((1, 13))) and problem._nonempty
    rng = np.random.default_rng(0)
    for x in (np.zeros(13), rng.standard_normal(13), 30 * rng.standard_normal(13)):
        with compiled(True):
            fast = problem.evaluate(x, client_grads=client_grads)
        with compiled(False):
            slow = problem.evaluate(x, client_grads=client_grads)
        assert fast.loss == pytest.approx(slow.loss, rel=1e-13)
        assert fast.accuracy == slow.accuracy
        np.testing.assert_allclose(fast.grad, slow.grad, rtol=1e-12, atol=1e-15)
        if client_grads:
            np.testing.assert_allclose(fast.client_grads, slow.client_grads, rtol=1e-12, atol=1e-15)
        else:
            assert fast.client_grads is None and slow.client_grads is None


def test_a_clients_full_gradient_is_the_evaluations_row_bit_for_bit():
    """The Flower client computes its gradient with ``grads`` (a batch of one); the batched engine reads
    the evaluation's rows: with the compiled pass both are the same numbers."""
    from fl_clip21.problems import build_problem

    cfg = resolve({
        "algorithms": ["clip21-gd"], "num-clients": 6, "seed": 2,
        "problem": {"name": "logreg", "dataset": "synthetic", "rows": 240, "features": 9},
        "partition": {"kind": "dirichlet", "alpha": 1.0},
    })
    problem = build_problem(cfg)
    x = np.random.default_rng(1).standard_normal(10)
    for on in (True, False):
        with compiled(on):
            every = problem.evaluate(x, client_grads=True).client_grads
            for i in range(6):
                one = problem.grads(x, np.array([i]))
                if on:
                    np.testing.assert_array_equal(one[0], every[i])
                else:
                    np.testing.assert_allclose(one[0], every[i], rtol=1e-12, atol=1e-15)
            if on:  # any batch of clients, in any order
                np.testing.assert_array_equal(problem.grads(x, np.array([4, 1])), every[[4, 1]])


def test_a_read_only_install_compiles_without_the_cache(monkeypatch):
    """Where numba finds no writable place for its cache it refuses cache=True when a function is
    decorated; the module then compiles each process instead of failing to import."""
    import importlib

    real = kernels.numba.njit

    def no_cache(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'kernels.py'")
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.numba, "njit", no_cache)
    try:
        reloaded = importlib.reload(kernels)
        C, V, active, _, _ = reloaded.clip_ef_step(np.array([[3.0, 4.0]]), np.zeros((1, 2)), np.array([1.0]), None)
        np.testing.assert_allclose(C, [[0.6, 0.8]])
        assert active.tolist() == [True]
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)


def test_the_loops_refuse_shapes_they_would_read_past():
    """A compiled loop does not check its indices: its wrapper checks every shape first."""
    X, signs = np.ones((4, 3)), np.ones(4)
    starts, sizes = np.array([0, 2]), np.array([2, 2])
    with pytest.raises(ValueError, match="do not fit X"):
        kernels.logreg_evaluate(X, signs, np.ones(2), np.zeros(3), starts, sizes, True)
    with pytest.raises(ValueError, match="outside X"):
        kernels.logreg_evaluate(X, signs, np.ones(3), np.zeros(3), starts, np.array([2, 3]), True)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.clip_ef_step(np.ones((2, 3)), np.ones((3, 3)), np.array([1.0]), None)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.clip_ef_step(np.ones((2, 3)), np.ones((2, 3)), np.ones(3), None)
    with pytest.raises(ValueError, match="add up to 3"):
        backend.NUMPY.row_sums(np.array([0, 1]), np.array([3]), 3)


def test_a_mistyped_kernels_variable_is_exit_2_in_the_cli_and_a_warning_in_a_library(tmp_path):
    """FL_CLIP21_KERNELS takes 'numba' or 'numpy'; 'off' is not silently read as either."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FL_CLIP21_KERNELS": "off"}
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "run", str(ROOT / "scenarios" / "logreg-nonconvex.toml"),
         "--out", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fl-clip21: error: FL_CLIP21_KERNELS must be 'numba' or 'numpy', got 'off'"
    assert not (tmp_path / "r").exists()  # nothing ran, nothing written
    library = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import numpy as np; from fl_clip21 import core; "
         "core.ef_step_rows(np.ones((2, 3)), np.zeros((2, 3)), core.clip_rows(1.0))"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert library.returncode != 0 and "FL_CLIP21_KERNELS must be 'numba' or 'numpy', got 'off'" in library.stderr
