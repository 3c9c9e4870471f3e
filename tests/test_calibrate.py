"""Choosing tau (fl_clip21.calibrate): the norms the clients' updates have, and the tau they suggest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_clip21.calibrate import PROBE_ROUNDS, calibrate, suggest_tau
from fl_clip21.config import ConfigError, resolve

ROOT = Path(__file__).resolve().parent.parent


def test_the_suggestion_is_the_largest_median_of_the_probe_rounds_gradient_norms():
    # Prepare: mean estimation, f_i(x) = |x - a_i|^2 / 2: client i's gradient at x is x - a_i, and GD
    # (lr 0.1, x_0 = 0) moves x to the mean m: x_k = (1 - 0.9^k) m.
    centers = np.asarray([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [20.0, 0.0]])  # three near 0, one far
    cfg = resolve({"algorithms": ["clip21-gd"], "num-clients": 4, "problem": {"name": "mean-estimation", "centers": centers.tolist()}})
    m = centers.mean(axis=0)
    medians = [float(np.median(np.linalg.norm((1 - 0.9**k) * m - centers, axis=1))) for k in range(3)]
    assert medians[0] < medians[1] < medians[2]  # x leaves the three: the rule has to look past round 1
    # Execute
    result = calibrate(cfg, rounds=3)
    # Assert
    assert result["algorithm"] == "gd"
    assert [r["update_norm_q50"] for r in result["rounds"]] == pytest.approx(medians)
    assert result["tau"] == pytest.approx(max(medians))
    assert result["tau_round"] == 1 + int(np.argmax(medians))
    assert result["rounds"][0]["update_norm_max"] == pytest.approx(20.0)  # |a_i| at x = 0: 1, 1, 1, 20
    assert calibrate(cfg, rounds=1)["tau"] == pytest.approx(medians[0])
    assert calibrate(cfg, rounds=1, quantile="q90")["tau"] == pytest.approx(np.percentile([1, 1, 1, 20], 90))
    assert len(calibrate(cfg)["rounds"]) == PROBE_ROUNDS == 5


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


def test_suggest_tau_takes_the_largest_of_the_probe_rounds_in_every_form_a_flower_app_has_them():
    history = [{"round": 1, "input_norm_q50": 0.3}, {"round": 2, "input_norm_q50": 4.2}, {"round": 3, "input_norm_q50": 2.0}]
    assert suggest_tau(history) == 4.2  # Clip21Strategy.history
    result = {k: {"fl_clip21.input_norm_q50": r["input_norm_q50"], "train_loss": 2.3} for k, r in enumerate(history, 1)}
    assert suggest_tau(result) == 4.2  # Result.train_metrics_clientapp: round -> MetricRecord
    assert suggest_tau(list(result.values())) == 4.2
    assert suggest_tau({**result, 4: {"train_loss": 2.0}}) == 4.2  # a round without norms (no accepted reply)
    with pytest.raises(ValueError, match="no round of the 2 given has 'input_norm_q50'"):
        suggest_tau([{"epsilon": 1.0}, {"epsilon": 2.0}])
    with pytest.raises(ValueError, match="every update was zero"):
        suggest_tau([{"input_norm_q50": 0.0}, {"input_norm_q50": 0.0}])
    with pytest.raises(ValueError, match="quantile must be one of q10, q50, q90, max"):
        suggest_tau(history, "q75")


def test_cli_calibrate_prints_the_table_and_the_tau_to_set():
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "calibrate", str(ROOT / "scenarios" / "logreg-nonconvex.toml")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| round | q10 | q50 | q90 | max |" in proc.stdout and "--set tau=" in proc.stdout
    assert "| 5 |" in proc.stdout and "the largest q50 of rounds 1-5, from round" in proc.stdout
