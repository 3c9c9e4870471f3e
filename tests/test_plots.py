"""Outputs people read: plot titles, the loss axis, accuracy against epsilon, ``--help`` of a scenario.

Plots are checked through the matplotlib Figures the plotting functions
return (titles, tick labels, lines), not through pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fl_clip21 import report
from fl_clip21.cli import main
from fl_clip21.config import load_scenario, resolve
from fl_clip21.engine import run_vectorized

ROOT = Path(__file__).resolve().parent.parent
LOGREG = ROOT / "scenarios" / "logreg-nonconvex.toml"
DIGITS_DP = ROOT / "scenarios" / "digits-dp.toml"


def _records(losses: list[float], **extra: float) -> list[dict]:
    """Per-round records as the engines write them, with these losses."""
    return [
        {"round": k + 1, "loss": f, "grad_norm_sq": 10.0 ** -k, "bytes_up": 100, **extra}
        for k, f in enumerate(losses)
    ]


def _spy_on_figures(monkeypatch) -> dict[str, object]:
    """Every Figure :mod:`fl_clip21.report` saves, by the path it is saved to (relative names)."""
    figures: dict[str, object] = {}
    finish = report._finish

    def spy(plt, fig, ax, path, title):
        figures[str(path)] = finish(plt, fig, ax, path, title)
        return figures[str(path)]

    monkeypatch.setattr(report, "_finish", spy)
    return figures


def test_every_plot_of_a_run_is_titled_with_problem_n_tau_and_lr(tmp_path, monkeypatch):
    # Prepare
    figures = _spy_on_figures(monkeypatch)
    cfg = load_scenario(LOGREG, {"rounds": "5"})
    # Execute
    report.write_outputs(tmp_path, [(cfg, run_vectorized(cfg))])
    # Assert
    names = sorted(Path(p).name for p in figures)
    assert names == ["accuracy.png", "bytes.png", "convergence.png", "loss.png"]
    for fig in figures.values():
        assert fig.axes[0].get_title() == "logreg-nonconvex — logreg on breast_cancer, n=10, τ=0.1, γ=1"


def test_plots_of_an_epsilon_grid_name_their_epsilon_and_seed_and_accuracy_vs_epsilon_reads(tmp_path, monkeypatch):
    # Prepare: digits-dp's grid of target epsilons 3, 9, 27 and two seeds, with made-up records.
    figures = _spy_on_figures(monkeypatch)
    cfg = load_scenario(DIGITS_DP, {"algorithms": "clip21-sgd2m,clip-sgd"})
    runs = []
    for eps in cfg["target-epsilon"]:
        for seed in (0, 1):
            run = {**cfg, "target-epsilon": [eps], "seed": seed}
            acc = 0.3 + eps / 100
            results = {
                name: {"records": _records([2.3, 1.5, 1.2], accuracy=acc, epsilon=eps), "params": {},
                       "wall_seconds": 1.0}
                for name in cfg["algorithms"]
            }
            runs.append((run, results))
    # Execute
    report.write_outputs(tmp_path, runs)
    # Assert: each run's plots carry its own epsilon and seed.
    loss = figures[str(tmp_path / "eps-9" / "seed-1" / "loss.png")]
    assert loss.axes[0].get_title() == "digits-dp — mlp on digits, n=20, τ=1, γ=1, ε=9, seed 1"
    assert "ε=27, seed 0" in figures[str(tmp_path / "eps-27" / "seed-0" / "accuracy.png")].axes[0].get_title()
    ax = figures[str(tmp_path / "accuracy_vs_epsilon.png")].axes[0]
    assert ax.get_title() == "digits-dp — mlp on digits, n=20, τ=1, γ=1, mean over seeds 0, 1"
    # x ticks at the grid's epsilons, written as plain numbers, and no minor ticks beside them
    assert list(ax.get_xticks()) == [3.0, 9.0, 27.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "9", "27"]
    assert ax.xaxis.get_minorticklocs().size == 0
    chance = [line for line in ax.get_lines() if line.get_label() == "chance"]
    assert len(chance) == 1 and set(chance[0].get_ydata()) == {0.1}
    assert "chance" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_chance_is_one_over_the_classes_of_the_problem():
    assert report.chance_accuracy(load_scenario(DIGITS_DP)) == pytest.approx(0.1)
    assert report.chance_accuracy(load_scenario(LOGREG)) == pytest.approx(0.5)
    assert report.chance_accuracy(resolve({"problem": {"name": "mean-estimation"}})) is None


def test_titles_of_other_problems_and_of_noise_without_a_target_epsilon():
    mean = resolve({"name": "m", "problem": {"name": "mean-estimation", "dim": 4}})
    assert report.plot_title(mean) == "m — mean-estimation, d=4, n=10, τ=1, γ=0.1"
    noisy = resolve({"name": "s", "sigma": 0.5, "algorithms": ["clip-gd"], "problem": {"name": "logreg"}})
    assert report.plot_title(noisy, seed=True) == "s — logreg on breast_cancer, n=10, τ=1, γ=0.1, σ=0.5, seed 0"
    assert report.plot_title(noisy, leave_out=["tau", "lr"]) == "s — logreg on breast_cancer, n=10, σ=0.5"


def test_loss_that_converges_is_plotted_as_the_gap_to_the_best_on_a_log_axis(tmp_path):
    # Prepare: one algorithm converges to 0.25, one stalls 1e-3 above it (logreg-nonconvex's picture).
    series = {
        "gd": _records([0.25 + 0.35 * 0.5**k for k in range(60)]),
        "clip-gd": _records([0.251 + 0.35 * 0.5**k for k in range(60)]),
    }
    # Execute
    fig = report.plot_loss(series, tmp_path / "loss.png", "t")
    # Assert
    ax = fig.axes[0]
    f_best = report.loss_view(series)
    assert 0.25 - 1e-11 < f_best < 0.25
    assert ax.get_yscale() == "log" and "f_best" in ax.get_ylabel()
    gd = ax.get_lines()[0].get_ydata()
    assert gd[0] == pytest.approx(0.35) and gd[-1] == pytest.approx(0.25 - f_best)
    low, high = ax.get_ylim()
    assert sum(low <= t <= high for t in ax.get_yticks()) >= 4  # labelled decades, not three ticks


def test_loss_whose_curves_stay_apart_is_plotted_on_a_linear_axis(tmp_path):
    rng = np.random.default_rng(0)
    noisy = {name: _records(list(2.3 - 0.01 * np.arange(50) + rng.normal(0, 0.05, 50))) for name in ("a", "b")}
    assert report.loss_view(noisy) is None
    ax = report.plot_loss(noisy, tmp_path / "loss.png", "t").axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylabel() == "loss f(x)"
    flat = {"a": _records([0.5] * 5)}
    assert report.loss_view(flat) is None  # no range: nothing to take a log of


@pytest.mark.parametrize(
    "values, labels",
    [
        ([40.0, 12.0, 6.0, 30.0], ["6", "7", "8", "9", "10", "20", "30", "40"]),  # under a decade: 1-9
        ([1e-3, 1e-1], ["0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1"]),  # under three: 1, 2, 5
    ],
)
def test_a_log_axis_of_a_few_decades_gets_at_least_four_labels(tmp_path, values, labels):
    series = {"a": [{"round": k, "grad_norm_sq": v, "bytes_up": 1} for k, v in enumerate(values)]}
    ax = report.plot_lines(series, "round", "grad_norm_sq", tmp_path / "c.png", "t", log_y=True).axes[0]
    low, high = ax.get_ylim()
    assert [t.get_text() for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if low <= v <= high] == labels


def test_run_help_with_a_scenario_shows_its_values_marked_where_they_differ(capsys):
    # Execute
    with pytest.raises(SystemExit) as done:
        main(["run", str(LOGREG), "--set", "rounds=7", "--help"])
    # Assert
    assert done.value.code == 0
    lines = {line.split()[1] if line.startswith("*") else line.split()[0]: line
             for line in capsys.readouterr().out.splitlines() if line.startswith(("* ", "  ")) and len(line) > 33}
    assert lines["tau"].startswith("* tau ") and lines["tau"].endswith("[0.1; default: 1.0]")
    assert lines["rounds"].endswith("[7; default: 100]")  # --set counts
    assert lines["seed"].startswith("  seed ") and lines["seed"].endswith("[0, the default]")


def test_help_without_a_scenario_shows_the_built_in_defaults_and_sweep_help_reads_a_scenario(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "[default: 1.0]" in out and "* tau" not in out
    with pytest.raises(SystemExit) as done:
        main(["sweep", "--help", str(LOGREG)])
    assert done.value.code == 0
    assert "[0.1; default: 1.0]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sweep", "-h"])
    assert "[default: 1.0]" in capsys.readouterr().out


def test_help_of_a_scenario_that_does_not_resolve_is_the_runs_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.toml"), "--help"]) == 2
    assert "scenario file not found" in capsys.readouterr().err
    assert main(["run", str(LOGREG), "--set", "tau=-1", "--help"]) == 2
    assert "tau must be > 0, got -1.0" in capsys.readouterr().err
