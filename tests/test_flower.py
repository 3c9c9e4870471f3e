"""Real Flower simulations (Ray backend): the strategy, the client state, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_clip21.config import load_scenario, parse_sets, resolve
from fl_clip21.engine import run_local
from fl_clip21.flower.client import make_client_app
from fl_clip21.flower.faults import scale_reply_mod
from fl_clip21.flower.simulation import simulate

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_g_equals_mean_of_client_v_every_round(fraction):
    # Prepare: 6 clients, random centres in 3-D, clipping active for many rounds.
    cfg = resolve(
        {
            "algorithms": ["clip21-gd"], "rounds": 25, "lr": 0.5, "tau": 0.3, "seed": 3,
            "num-clients": 6, "fraction": fraction, "audit": True,
            "problem": {"name": "mean-estimation", "dim": 3, "spread": 2.0},
        }
    )
    # Execute
    res = simulate(cfg)["clip21-gd"]
    # Assert: the v_i the clients hold in context.state average to the server's g.
    recs = res["records"]
    assert len(recs) == 25
    assert all(r["participants"] == (6 if fraction == 1 else 3) for r in recs)
    assert max(r["invariant_gap"] for r in recs) < 1e-12
    assert max(r["memory_gap"] for r in recs) < 1e-12  # every client started from the server's copy
    assert recs[0]["clip_fraction"] > 0  # the clipping really was active
    # The same iterates as the in-process reference engine (same sampling and seeds).
    assert _max_diff(res["params"], run_local(cfg, "clip21-gd")["params"]) < 1e-12


def test_oversized_and_nan_increments_are_rejected_and_the_run_goes_on(caplog):
    cfg = resolve(
        {
            "algorithms": ["clip21-gd", "clip-gd"], "rounds": 8, "lr": 0.5, "tau": 1.0,
            "num-clients": 4, "problem": {"name": "mean-estimation", "dim": 2, "spread": 3.0},
        }
    )
    app = make_client_app(train_mods=[scale_reply_mod(1e6, clients=[1]), scale_reply_mod(float("nan"), [2])])
    results = simulate(cfg, client_app=app)
    for name in ("clip21-gd", "clip-gd"):
        recs = results[name]["records"]
        assert len(recs) == 8
        # Client 1's norm is above tau from the first round (its gradient is not zero), client 2 is NaN.
        assert all(r["rejected"] == 2 and r["accepted"] == 2 for r in recs)
        assert all(np.isfinite(v).all() for v in results[name]["params"].values())


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "run", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_cli_mean_estimation_clip_gd_stalls_and_clip21_converges(tmp_path):
    out = tmp_path / "out"
    proc = _cli(str(SCENARIOS / "mean-estimation.toml"), "--set", "rounds=80", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["rounds"] == 80 and config["tau"] == 1.0
    assert (out / "convergence.png").stat().st_size > 1000
    algos = metrics["algorithms"]
    assert set(algos) == {"gd", "clip-gd", "clip21-gd"}
    for name, recs in algos.items():
        assert [r["round"] for r in recs] == list(range(1, 81))
        for key in ("loss", "grad_norm_sq", "clip_fraction", "rejected", "bytes_up"):
            assert key in recs[-1], (name, key)
    # f = (1/3) sum 0.5 (x - a_i)^2 has gradient x - 8/3: grad_norm_sq = (x - 8/3)^2.
    x_clip = 8 / 3 - np.sqrt(algos["clip-gd"][-1]["grad_norm_sq"])
    assert x_clip == pytest.approx(-0.5, abs=1e-6)
    assert algos["clip21-gd"][-1]["grad_norm_sq"] < 1e-16
    assert algos["gd"][-1]["grad_norm_sq"] < 1e-16
    assert algos["clip21-gd"][0]["clip_fraction"] > 0


def test_cli_centres_from_npy_file(tmp_path):
    centres = tmp_path / "a.npy"
    np.save(centres, np.array([[-1.0, 2.0], [-1.0, 0.0], [10.0, 1.0]]))
    out = tmp_path / "out"
    proc = _cli(
        str(SCENARIOS / "mean-estimation.toml"), "--set", f"problem.centers={centres}",
        "--set", "algorithms=clip21-gd", "--set", "rounds=60", "--engine", "vectorized", "--out", str(out), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads((out / "metrics.json").read_text())["algorithms"]["clip21-gd"]
    assert recs[-1]["grad_norm_sq"] < 1e-12
    assert recs[-1]["bytes_up"] == 3 * 2 * 8  # three clients, one float64 increment of size 2


def test_shipped_scenarios_resolve():
    for path in SCENARIOS.glob("*.toml"):
        cfg = load_scenario(path, parse_sets([]))
        assert cfg["algorithms"], path


def test_runs_in_one_simulation_do_not_share_client_state():
    # Two runs of the same config on the same nodes: each starts from v_i = 0.
    cfg = resolve(
        {
            "algorithms": ["clip21-gd"], "rounds": 10, "lr": 0.5, "tau": 0.3, "num-clients": 3,
            "problem": {"name": "mean-estimation", "dim": 2, "spread": 2.0},
        }
    )
    first, second = simulate([cfg, cfg])
    reference = run_local(cfg, "clip21-gd")["params"]
    assert _max_diff(first["clip21-gd"]["params"], reference) < 1e-12
    assert _max_diff(second["clip21-gd"]["params"], reference) < 1e-12
