"""The batched core: layouts, row-wise operators, counter-based streams, the engine benchmark."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_clip21 import core, kernels, streams
from fl_clip21.layout import Layout


def test_layout_flattens_in_key_order_and_back_with_each_dtype():
    params = {"b": np.arange(3, dtype=np.float32), "w": np.ones((2, 2), dtype=np.float32), "s": np.full((), 5.0, dtype=np.float32)}
    layout = Layout.of(params)
    flat = layout.flatten(params)
    assert layout.size == 8 and flat.dtype == np.float32
    np.testing.assert_array_equal(flat, [0, 1, 2, 1, 1, 1, 1, 5])
    back = layout.unflatten(flat)
    assert list(back) == ["b", "w", "s"] and back["w"].shape == (2, 2) and back["s"].shape == ()
    with pytest.raises(ValueError, match=r"array 'w' has shape \(4,\), the model's is \(2, 2\)"):
        layout.flatten({**params, "w": np.ones(4)})


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                  elements=st.floats(-1e200, 1e200, allow_subnormal=False)),
       st.floats(1e-3, 1e3))
def test_clip_rows_bounds_every_row_and_is_idempotent(Y, tau):
    C, active, norms = core.clip_rows(tau)(Y)
    assert np.all(core.row_norms(C) <= tau * (1 + 1e-12))
    np.testing.assert_array_equal(active, norms > tau)
    again, still, _ = core.clip_rows(tau)(C)
    np.testing.assert_allclose(again, C, rtol=1e-12, atol=0)
    assert not still.any() or np.allclose(core.row_norms(C)[still], tau)


def test_clip_rows_takes_a_threshold_per_row_and_leaves_zero_rows_zero():
    Y = np.array([[3.0, 4.0], [3.0, 4.0], [0.0, 0.0]])
    C, active, norms = core.clip_rows(np.array([1.0, 10.0, 1.0]))(Y)
    np.testing.assert_allclose(C, [[0.6, 0.8], [3.0, 4.0], [0.0, 0.0]])
    assert active.tolist() == [True, False, False] and norms.tolist() == [5.0, 5.0, 0.0]


def test_ef_step_rows_in_place_gives_the_same_numbers_and_moves_no_copy():
    rng = np.random.default_rng(0)
    target, memory = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    fresh = core.ef_step_rows(target.copy(), memory.copy(), core.clip_rows(0.5))
    t, m = target.copy(), memory.copy()
    inplace = core.ef_step_rows(t, m, core.clip_rows(0.5), overwrite_target=True, overwrite_memory=True)
    assert inplace.memory is m and inplace.increment is t
    np.testing.assert_array_equal(inplace.memory, fresh.memory)
    np.testing.assert_array_equal(inplace.increment, fresh.increment)
    np.testing.assert_allclose(fresh.memory, memory + fresh.increment)


def test_a_clients_stream_does_not_depend_on_the_batch_it_is_drawn_with():
    together = streams.normals(7, streams.NOISE, np.arange(50), 3, 11)
    alone = streams.normals(7, streams.NOISE, np.array([17]), 3, 11)
    np.testing.assert_array_equal(together[17], alone[0])
    # other round, purpose, step or seed: other numbers
    for other in (streams.normals(7, streams.NOISE, np.array([17]), 4, 11),
                  streams.normals(7, streams.BATCH, np.array([17]), 3, 11),
                  streams.normals(7, streams.NOISE, np.array([17]), 3, 11, step=1),
                  streams.normals(8, streams.NOISE, np.array([17]), 3, 11)):
        assert not np.allclose(other, alone)


def test_streams_look_uniform_and_normal():
    u = streams.uniforms(0, streams.BATCH, np.arange(200), 1, 500)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    z = streams.normals(0, streams.NOISE, np.arange(200), 1, 500)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < 0.01


def test_torch_draws_the_same_numbers_bit_for_bit():
    pytest.importorskip("torch")
    got = streams.uniforms_torch(3, streams.BATCH, np.arange(9), 5, 40).numpy()
    np.testing.assert_array_equal(got, streams.uniforms(3, streams.BATCH, np.arange(9), 5, 40))


def test_bench_engines_prints_ratios_against_the_bound_the_loop_and_torch(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "engines.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "bench", "--engines", "--points", "10x31,100x101",
         "--mlp-clients", "5", "--rounds", "2", "--repeats", "1", "--no-sweep", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [(r["problem"], r["clients"], r["d"]) for r in rows] == [("logreg", 10, 31), ("logreg", 100, 101), ("mlp", 5, 2410)]
    for r in rows:
        assert r["batched_over_bound"] > 0 and r["loop_over_batched"] > 0 and r["bound"]["min_ms"] > 0
        assert r["device"]["device"] == "cpu" and r["device"]["batched_over_bound"] > 0
        assert r["device"]["numpy_over_device"] > 0
        # the data read once, the clients' memories read and written once
        assert r["bytes_moved"] == r["data_bytes"] + 2 * r["memory_bytes"]
    # logreg at 10 x 31: 1000 rows x 31 float64s; 10 memories of 31 float64s. The MLP: float32 features.
    assert (rows[0]["data_bytes"], rows[0]["memory_bytes"]) == (1000 * 31 * 8, 10 * 31 * 8)
    assert rows[2]["memory_bytes"] == 5 * 2410 * 4 and rows[2]["data_bytes"] % (64 * 4) == 0
    assert result["machine"]["device"] == "cpu" and result["machine"]["torch_threads"] == 1
    # with numba, each point also runs with the compiled loops off, in the same process
    assert result["machine"]["kernels"] == kernels.name()
    assert all(("numpy_only" in r) == kernels.ENABLED for r in rows)
    assert all(r["numpy_only_over_batched"] > 0 for r in rows if "numpy_only" in r)
    assert "| problem | n | d |" in proc.stdout and "torch-cpu ms/round" in proc.stdout


def test_bench_engines_on_a_missing_gpu_exits_2_before_anything_runs(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    from fl_clip21 import cli

    out = tmp_path / "engines.json"
    assert cli.main(["bench", "--engines", "--device", "cuda", "--no-sweep", "--out", str(out)]) == 2
    assert not out.exists()


def test_bench_sweep_times_the_batched_sweep_against_one_run_at_a_time():
    from fl_clip21.bench_engines import bench_sweep

    result = bench_sweep(repeats=1)
    assert result["cell_runs"] == 60 and result["batched_cell_runs_per_second"] > 0
    assert result["one_at_a_time_over_batched"] > 0
