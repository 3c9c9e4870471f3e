"""The algorithm family: SGD2M, Top-k, CELGC, Flower's DP baseline, accounting, outputs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_clip21.config import ConfigError, resolve, with_epsilon
from fl_clip21.engine import run_local
from fl_clip21.flower.simulation import simulate
from fl_clip21.privacy import calibrate_noise_multiplier, epsilon

ROOT = Path(__file__).resolve().parent.parent


def _cfg(**over):
    base = {
        "rounds": 15, "num-clients": 5, "lr": 0.5, "tau": 0.1, "batch-size": 16,
        "problem": {"name": "logreg"}, "partition": {"kind": "label-sorted"},
    }
    base.update(over)
    return resolve(base)


def _same(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_sgd2m_with_unit_betas_and_no_noise_is_clip21_sgd_exactly():
    cfg = _cfg(beta1=1.0, beta2=1.0, sigma=0.0)
    a = run_local(cfg, "clip21-sgd2m")
    b = run_local(cfg, "clip21-sgd")
    assert _same(a["params"], b["params"]) == 0.0
    assert [r["clip_fraction"] for r in a["records"]] == [r["clip_fraction"] for r in b["records"]]
    assert a["records"][0]["clip_fraction"] > 0  # clipping was active


def test_sgd2m_momentum_changes_the_iterates_and_noise_is_seeded():
    base = _cfg(algorithms=["clip21-sgd2m"], beta1=0.5, beta2=0.5, sigma=0.05)
    a, b = run_local(base, "clip21-sgd2m"), run_local(base, "clip21-sgd2m")
    assert _same(a["params"], b["params"]) == 0.0  # same seed, same noise
    other = run_local({**base, "seed": 1}, "clip21-sgd2m")
    assert _same(a["params"], other["params"]) > 1e-6
    quiet = run_local({**base, "sigma": 0.0}, "clip21-sgd2m")
    assert _same(a["params"], quiet["params"]) > 1e-6
    plain = run_local(_cfg(), "clip21-sgd")
    assert _same(quiet["params"], plain["params"]) > 1e-6


def test_ef21_topk_with_k_equal_d_is_gd():
    cfg = _cfg(topk=31)  # breast_cancer: 30 features + intercept
    a, b = run_local(cfg, "ef21-topk"), run_local(cfg, "gd")
    assert _same(a["params"], b["params"]) < 1e-12


def test_topk_bytes_count_indices_and_values():
    cfg = _cfg(topk=3, rounds=2)
    recs = run_local(cfg, "clip21-topk")["records"]
    assert recs[0]["bytes_up"] == 5 * 3 * (4 + 8)  # 5 clients, 3 int32 indices + 3 float64 values
    assert run_local(cfg, "clip21-gd")["records"][0]["bytes_up"] == 5 * 31 * 8


def test_topk_fraction_and_clip21_topk_bound():
    cfg = _cfg(topk=0.1, rounds=3)  # round(0.1 * 31) = 3 entries
    assert run_local(cfg, "ef21-topk")["records"][0]["bytes_up"] == 5 * 3 * 12


def test_celgc_one_step_without_clipping_is_flowers_fedavg():
    # Flower's FedAvg (inside its DP wrapper, with no noise and an inactive clip) over
    # clients taking one local SGD step, against celgc with tau far above every gradient.
    cfg = _cfg(tau=1e9, sigma=0.0, **{"local-steps": 1}, algorithms=["celgc", "flower-dp-fixed"], rounds=5)
    res = simulate(cfg)
    assert _same(res["celgc"]["params"], res["flower-dp-fixed"]["params"]) < 1e-12
    assert res["celgc"]["records"][0]["clip_fraction"] == 0
    assert _same(res["celgc"]["params"], run_local(cfg, "celgc")["params"]) < 1e-12


# --- accounting -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "rounds", "delta", "expected"),
    [(1.0, 100, 1e-5, 91.8172896), (5.0, 150, 1e-3, 9.92787797), (12.7036872383, 150, 1e-3, 3.0)],
)
def test_epsilon_pinned_and_against_dp_accounting(z, rounds, delta, expected):
    eps = epsilon(z, rounds, delta)
    assert eps == pytest.approx(expected, rel=1e-4)
    rdp = RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert eps <= rdp.get_epsilon(delta)  # RDP is an upper bound on the true epsilon
    pld = PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(rounds)))
    assert eps == pytest.approx(pld.get_epsilon(delta), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(z=st.floats(0.3, 30), rounds=st.integers(1, 400), delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_epsilon_monotone_in_rounds_and_noise(z, rounds, delta):
    assert epsilon(z, rounds + 1, delta) >= epsilon(z, rounds, delta)
    assert epsilon(z * 1.1, rounds, delta) <= epsilon(z, rounds, delta)


@pytest.mark.parametrize(("target", "rounds"), [(3.0, 50), (9.0, 150), (27.0, 10)])
def test_calibration_meets_the_target_from_below(target, rounds):
    z = calibrate_noise_multiplier(target, rounds, 1e-3)
    assert epsilon(z, rounds, 1e-3) <= target
    assert epsilon(z * (1 - 1e-6), rounds, 1e-3) > target * (1 - 1e-4)


def test_reported_epsilon_follows_participation():
    cfg = with_epsilon(_cfg(sigma=0.0, fraction=0.4, rounds=10), 5.0)
    recs = run_local(cfg, "clip-sgd")["records"]
    eps = [r["epsilon"] for r in recs]
    assert eps == sorted(eps) and eps[-1] <= 5.0
    assert "epsilon" not in run_local(cfg, "clip21-sgd")["records"][-1]  # no noise: no DP claim


@pytest.mark.parametrize(
    ("key", "value"),
    [("beta1", "0"), ("beta1", "1.5"), ("beta2", "-0.1"), ("sigma", "-1"), ("delta", "0"), ("delta", "1"),
     ("topk", "0"), ("topk", "2.5"), ("target-epsilon", "-3"), ("local-steps", "0")],
)
def test_bad_family_keys_name_key_and_value(key, value):
    with pytest.raises(ConfigError) as err:
        resolve({}, {key: value})
    assert key in str(err.value) and value in str(err.value)


def test_cli_bad_beta_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "run", str(ROOT / "scenarios" / "digits-dp.toml"),
         "--set", "beta1=2", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "beta1" in proc.stderr and "2" in proc.stderr
    assert not (tmp_path / "o").exists()


# --- outputs ----------------------------------------------------------------------


def test_cli_epsilon_grid_writes_summary_and_plots(tmp_path):
    out = tmp_path / "dp"
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "run", str(ROOT / "scenarios" / "digits-dp.toml"),
         "--set", "rounds=3", "--set", "num-clients=4", "--set", "partition.kind=iid",
         "--set", "target-epsilon=3,27", "--set", "seeds=0,1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {(r["algorithm"], r["target_epsilon"]) for r in rows} == {
        (a, e) for a in ("clip21-sgd2m", "clip-sgd", "flower-dp-fixed") for e in ("3.0", "27.0")
    }
    for r in rows:
        assert r["seeds"] == "2"
        assert float(r["epsilon"]) <= float(r["target_epsilon"])
        assert float(r["epsilon"]) >= 0.99 * float(r["target_epsilon"])  # all rounds are accounted
        assert 0 <= float(r["best_accuracy"]) <= 1 and int(float(r["bytes_up"])) > 0
    for eps in ("3", "27"):
        for seed in ("0", "1"):
            m = json.loads((out / f"eps-{eps}" / f"seed-{seed}" / "metrics.json").read_text())
            assert set(m["algorithms"]) == {"clip21-sgd2m", "clip-sgd", "flower-dp-fixed"}
    assert (out / "accuracy_vs_epsilon.png").stat().st_size > 1000
    assert "clip21-sgd2m" in (out / "summary.md").read_text()
