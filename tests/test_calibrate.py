"""Choosing tau (fl_clip21.calibrate): the norms the clients' updates have, and the tau they suggest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_clip21.calibrate import calibrate, suggest_tau
from fl_clip21.config import ConfigError, resolve

ROOT = Path(__file__).resolve().parent.parent


def test_the_suggestion_is_the_median_of_the_first_rounds_gradient_norms():
    # Prepare: mean estimation, f_i(x) = |x - a_i|^2 / 2, so at x = 0 client i's gradient norm is |a_i|.
    centers = [[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 2.0]]
    cfg = resolve({"algorithms": ["clip21-gd"], "num-clients": 4, "problem": {"name": "mean-estimation", "centers": centers}})
    # Execute
    result = calibrate(cfg)
    # Assert
    norms = np.linalg.norm(np.asarray(centers), axis=1)  # 5, 1, 10, 2
    assert result["algorithm"] == "gd"
    assert result["tau"] == pytest.approx(np.median(norms))
    assert result["rounds"][0]["update_norm_max"] == pytest.approx(10.0)
    assert calibrate(cfg, quantile="q90")["tau"] == pytest.approx(np.percentile(norms, 90))


def test_stochastic_algorithms_are_calibrated_on_minibatch_gradients():
    cfg = resolve({"algorithms": ["clip21-sgd"], "num-clients": 5, "batch-size": 4, "problem": {"name": "logreg"}})
    assert calibrate(cfg, rounds=2)["algorithm"] == "sgd"


def test_nothing_to_calibrate_and_bad_arguments_are_errors():
    cfg = resolve({"algorithms": ["gd"], "problem": {"name": "mean-estimation"}})
    with pytest.raises(ConfigError, match="take no tau"):
        calibrate(cfg)
    cfg = resolve({"algorithms": ["clip21-gd"], "problem": {"name": "mean-estimation"}})
    with pytest.raises(ConfigError, match="--rounds must be in 1..1000, got 0"):
        calibrate(cfg, rounds=0)


def test_suggest_tau_reads_a_rounds_record_and_says_when_it_cannot():
    assert suggest_tau({"input_norm_q50": 0.3}) == 0.3
    assert suggest_tau({"update_norm_q90": 2.0}, "q90", "update_norm") == 2.0
    # the round's train MetricRecord of Strategy.start's Result, where the strategy's keys are prefixed
    assert suggest_tau({"fl_clip21.input_norm_q50": 0.4, "train_loss": 2.3}) == 0.4
    with pytest.raises(ValueError, match="DP noise hides them"):
        suggest_tau({"epsilon": 3.0})


def test_cli_calibrate_prints_the_table_and_the_tau_to_set():
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "calibrate", str(ROOT / "scenarios" / "logreg-nonconvex.toml")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| round | q10 | q50 | q90 | max |" in proc.stdout and "--set tau=" in proc.stdout
