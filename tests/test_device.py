"""The batched engine on torch (``device=cpu``): numpy's trajectory to float rounding.

docs/algorithms.md, "Backends".

CUDA runs the same torch code; the benchmark (``fl-clip21 bench --engines
--device cuda``) is where a GPU is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_clip21 import cli, core, streams
from fl_clip21.algorithms import ALGORITHMS, CENTRAL_DP
from fl_clip21.cells import run_cells
from fl_clip21.config import ConfigError, resolve
from fl_clip21.engine import run_local

torch = pytest.importorskip("torch")
SCENARIO = str(Path(__file__).resolve().parent.parent / "scenarios" / "mean-estimation.toml")

# Hyper-parameters that make each algorithm do its work: noise, momentum, Top-k, local steps.
EXTRA = {
    "clip-gd": {"sigma": 0.01}, "clip-sgd": {"sigma": 0.01}, "clip21-topk": {"topk": 3}, "ef21-topk": {"topk": 3},
    "clip21-sgd2m": {"beta1": 0.5, "beta2": 0.7, "sigma": 0.01}, "celgc": {"local-steps": 2},
}
PROBLEMS = {
    "mean-estimation": {"name": "mean-estimation", "dim": 7},
    "logreg": {"name": "logreg", "dataset": "synthetic", "rows": 300, "features": 9},
    "mlp": {"name": "mlp", "hidden": 8},
}
# Every registered algorithm, and central DP (the server's noise) on each algorithm that has it.
RUNS = [(name, {}) for name in ALGORITHMS] + [(name, {"dp": "central", "sigma": 0.05}) for name in CENTRAL_DP]
RECORD_KEYS = ("loss", "grad_norm_sq", "accuracy", "clip_fraction", "accepted", "failed", "bytes_up", "epsilon",
               "update_norm_q50", "input_norm_max")


def _cfg(problem: str, name: str, extra: dict, **keys) -> dict:
    return resolve({
        "algorithms": [name], "rounds": 6, "num-clients": 6, "seed": 3, "fraction": 0.5, "lr": 0.5, "tau": 0.3,
        "problem": PROBLEMS[problem], **EXTRA.get(name, {}), **extra, **keys,
    })


def _assert_same_run(a: dict, b: dict, rel: float, atol: float) -> None:
    for ra, rb in zip(a["records"], b["records"], strict=True):
        for key in RECORD_KEYS:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=atol), (key, ra["round"])
    for name, value in a["params"].items():
        np.testing.assert_allclose(b["params"][name], value, rtol=rel, atol=atol)


@pytest.mark.parametrize("problem", ["mean-estimation", "logreg"])
@pytest.mark.parametrize("name, extra", RUNS, ids=[n + ("-central" if e else "") for n, e in RUNS])
def test_torch_on_the_cpu_follows_the_numpy_trajectory_in_float64(problem, name, extra):
    on_numpy = run_local(_cfg(problem, name, extra), name)
    on_torch = run_local(_cfg(problem, name, extra, device="cpu"), name)
    _assert_same_run(on_numpy, on_torch, rel=1e-10, atol=1e-13)
    for state, value in on_numpy["client_states"].items():
        np.testing.assert_allclose(on_torch["client_states"][state], value, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name, extra", [
    ("clip21-gd", {}), ("clip21-sgd2m", {}), ("clip21-topk", {}), ("celgc", {}),
    ("clip-gd", {"dp": "central", "sigma": 0.05}),
])
def test_torch_on_the_cpu_follows_the_numpy_trajectory_of_the_mlp_in_float32(name, extra):
    on_numpy = run_local(_cfg("mlp", name, extra, rounds=4), name)
    on_torch = run_local(_cfg("mlp", name, extra, rounds=4, device="cpu"), name)
    _assert_same_run(on_numpy, on_torch, rel=1e-5, atol=1e-6)


def test_dropped_replies_resync_the_same_way_on_torch():
    # Stragglers whose replies miss the timeout: the protocol's resync runs on device rows.
    keys = {"straggler-fraction": 0.4, "straggler-delay": 5.0, "round-timeout": 1.0, "rounds": 8}
    on_numpy = run_local(_cfg("logreg", "clip21-gd", {}, **keys), "clip21-gd")
    on_torch = run_local(_cfg("logreg", "clip21-gd", {}, device="cpu", **keys), "clip21-gd")
    assert sum(r["failed"] for r in on_numpy["records"]) > 0
    _assert_same_run(on_numpy, on_torch, rel=1e-10, atol=1e-13)


@pytest.mark.parametrize("name, extra", [("clip21-sgd2m", {"beta1": 0.5, "sigma": 0.01}), ("clip21-topk", {})])
def test_a_batched_sweep_on_torch_gives_each_cell_its_numpy_run(name, extra):
    def cells(device: str) -> list[dict]:
        grid = ((0.05, 1.0), (0.5, 0.3), (2.0, 0.5))
        return [_cfg("logreg", name, extra, tau=tau, lr=lr, device=device) for tau, lr in grid]

    for a, b in zip(run_cells(cells("numpy"), name), run_cells(cells("cpu"), name), strict=True):
        _assert_same_run(a, b, rel=1e-10, atol=1e-13)


PLUGIN = '''
import numpy as np

class Shifted:
    num_clients, classification = 4, False
    def init_params(self):
        return {"x": np.zeros(3)}
    def client_grad(self, i, params, rng=None, batch_size=None):
        return {"x": params["x"] - i + (0.1 * rng.normal(size=3) if rng is not None else 0.0)}
    def loss(self, params):
        return float(np.sum((params["x"] - 1.5) ** 2))
    def grad(self, params):
        return {"x": params["x"] - 1.5}
    def accuracy(self, params):
        return None

def make(cfg):
    return Shifted()
'''


def test_a_plug_in_problem_computes_on_numpy_inside_a_torch_run(tmp_path, monkeypatch):
    (tmp_path / "fl21_device_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = {}
    for device in ("numpy", "cpu"):
        cfg = resolve({"algorithms": ["clip21-sgd"], "rounds": 5, "num-clients": 4, "tau": 0.5, "device": device,
                       "problem": {"name": "fl21_device_plugin:make"}})
        runs[device] = run_local(cfg, "clip21-sgd")
    _assert_same_run(runs["numpy"], runs["cpu"], rel=1e-12, atol=1e-15)


# --- the operators ---------------------------------------------------------------


@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                  elements=st.floats(-1e300, 1e300, allow_subnormal=True)))
def test_row_norms_on_torch_are_numpys_even_where_squares_overflow_or_underflow(Y):
    expected = core.row_norms(Y)
    got = core.row_norms(torch.from_numpy(Y)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)


def test_the_operators_on_torch_clip_zero_rows_to_zero_and_keep_the_top_k():
    Y = np.array([[3.0, -4.0, 0.5], [0.0, 0.0, 0.0], [1.0, 2.0, -3.0]])
    for op in (core.clip_rows(np.array([1.0, 1.0, 10.0])), core.topk_rows(2),
               core.compose_rows(core.topk_rows(2), core.clip_rows(1.0))):
        want = op(Y.copy())
        got = op(torch.from_numpy(Y.copy()))
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-15, atol=0)
    assert core.clip_rows(1.0)(torch.zeros(2, 3))[0].abs().sum() == 0


def test_the_normal_streams_of_torch_are_numpys_to_the_last_bits():
    want = streams.normals(5, streams.NOISE, np.arange(7), 2, 13, step=1)
    got = streams.normals_torch(5, streams.NOISE, np.arange(7), 2, 13, step=1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)


# --- the key ----------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu_is_a_config_error_naming_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"device='cuda' needs a CUDA GPU, but torch .* sees no CUDA GPU"):
        resolve({"device": "cuda"})
    assert cli.main(["run", SCENARIO, "--engine", "vectorized", "--set", "device=cuda",
                     "--out", str(tmp_path / "out")]) == 2
    assert "device='cuda'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match=r"device must be one of numpy, cpu, cuda, got 'gpu'"):
        resolve({"device": "gpu"})


def test_the_flower_engine_refuses_a_device(tmp_path, capsys):
    assert cli.main(["run", SCENARIO, "--set", "device=cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "device='cpu' is for the batched engine (--engine vectorized)" in err and not (tmp_path / "o").exists()
