"""``fl-clip21 sweep``: the grid, its CSV/Markdown/heat maps, and bad --grid input."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import LogNorm

from fl_clip21.config import ConfigError
from fl_clip21.sweep import grid_cells, parse_grid, plot_heatmap

ROOT = Path(__file__).resolve().parent.parent
MEAN = ROOT / "scenarios" / "mean-estimation.toml"


def _sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "sweep", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_sweep_2x2_on_mean_estimation(tmp_path):
    # Execute
    out = tmp_path / "sweep"
    proc = _sweep(str(MEAN), "--grid", "tau=0.1,1", "--grid", "lr=0.5,1", "--out", str(out), cwd=tmp_path)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep [12/12]" in proc.stderr  # progress, one line per cell and algorithm
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert len(rows) == 4 * 3
    assert list(rows[0]) == ["tau", "lr", "algorithm", "rounds_to_target", "final_grad_norm_sq", "final_loss"]
    cells = {(r["tau"], r["lr"], r["algorithm"]): r for r in rows}
    assert set(cells) == {(t, lr, a) for t in ("0.1", "1") for lr in ("0.5", "1") for a in ("gd", "clip-gd", "clip21-gd")}
    for lr in ("0.5", "1"):
        # Clip-GD stalls at x = -0.5: grad_norm_sq = (8/3 + 0.5)^2 and never the target.
        stalled = cells[("1", lr, "clip-gd")]
        assert stalled["rounds_to_target"] == ""
        assert float(stalled["final_grad_norm_sq"]) == pytest.approx((8 / 3 + 0.5) ** 2, rel=1e-6)
        for tau in ("0.1", "1"):
            assert 1 <= int(cells[(tau, lr, "gd")]["rounds_to_target"]) <= 60
        assert int(cells[("1", lr, "clip21-gd")]["rounds_to_target"]) <= 60
    # GD: x_k - 8/3 = (1 - lr)^k (x_0 - 8/3), so lr = 1 reaches the minimiser in one round.
    assert cells[("1", "1", "gd")]["rounds_to_target"] == "1"
    # f = (1/3) sum 0.5 (x - a_i)^2 has its minimum 0.5 * var(a) = 121/9 at the mean.
    assert float(cells[("1", "0.5", "gd")]["final_loss"]) == pytest.approx(121 / 9)
    md = (out / "sweep.md").read_text()
    assert "| 1 | 0.5 | clip-gd | not reached |" in md
    for name in ("gd", "clip-gd", "clip21-gd"):
        assert (out / f"heatmap-{name}.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "grid, named",
    [
        (["--grid", "tau=0.1,-1"], ["tau", "-1"]),
        (["--grid", "bogus=1,2"], ["bogus", "1"]),
        (["--grid", "tau"], ["tau", "KEY=V1,V2"]),
        (["--grid", "tau=0.1", "--grid", "rounds=10,ten"], ["rounds", "ten"]),
    ],
)
def test_bad_grid_exits_2_naming_key_and_value_before_running(tmp_path, grid, named):
    out = tmp_path / "sweep"
    proc = _sweep(str(MEAN), *grid, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for text in named:
        assert text in proc.stderr
    assert "sweep [" not in proc.stderr  # nothing ran
    assert not out.exists()


def test_parse_grid_and_cells():
    grid = parse_grid(["tau=0.01, 0.1,1", "problem.dim=2,3"])
    assert grid == {"tau": ["0.01", "0.1", "1"], "problem.dim": ["2", "3"]}
    cells = grid_cells(grid)
    assert cells[:2] == [{"tau": "0.01", "problem.dim": "2"}, {"tau": "0.01", "problem.dim": "3"}]
    assert len(cells) == 6
    for bad in (["tau=1", "tau=2"], ["tau=1,1"], ["=1"], ["algorithms=gd,clip-gd"], []):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_heatmap_of_a_1d_grid_and_a_grid_that_never_reaches_the_target(tmp_path):
    grid = {"tau": ["0.1", "1", "10"]}
    rows = [
        {"tau": t, "algorithm": "x", "rounds_to_target": r, "final_grad_norm_sq": g}
        for t, r, g in zip(grid["tau"], (None, 12, 3), (3.1e-5, 1e-9, 0.0))
    ]
    plot_heatmap(rows, grid, tmp_path / "one-row.png", "1-D", max_rounds=20, target=1e-8)
    never = [{**r, "rounds_to_target": None} for r in rows]
    plot_heatmap(never, grid, tmp_path / "never.png", "never", max_rounds=20, target=1e-8)
    assert (tmp_path / "one-row.png").stat().st_size > 3000
    assert (tmp_path / "never.png").stat().st_size > 3000


def test_heatmap_shows_the_final_grad_norm_sq_of_cells_that_never_reach_the_target(tmp_path):
    # Prepare: a 2 x 2 grid where only one cell reaches the target.
    grid = {"tau": ["0.01", "0.1"], "lr": ["0.5", "1"]}
    values = {("0.01", "0.5"): (None, 3.1e-5), ("0.01", "1"): (None, 2.9e-7),
              ("0.1", "0.5"): (None, 1.6e-8), ("0.1", "1"): (30, 7.0e-13)}
    rows = [{"tau": t, "lr": lr, "algorithm": "clip21-gd", "rounds_to_target": r, "final_grad_norm_sq": g}
            for (t, lr), (r, g) in values.items()]
    # Execute
    fig = plot_heatmap(rows, grid, tmp_path / "h.png", "title", max_rounds=60, target=1e-8)
    # Assert: rounds to target on the left, the final grad_norm_sq on a log colour scale on the right.
    rounds_ax, grad_ax = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in rounds_ax.texts].count("not reached") == 3
    assert sorted(t.get_text() for t in grad_ax.texts) == ["1.6e-08", "2.9e-07", "3.1e-05", "7.0e-13"]
    image = grad_ax.images[0]
    assert isinstance(image.norm, LogNorm)
    # The scale stops at target / 100: 7e-13 takes its lowest colour, its label keeps the value.
    assert image.norm.vmin == pytest.approx(1e-10) and image.norm.vmax == pytest.approx(3.1e-5)
    assert image.get_array()[0, 0] == pytest.approx(3.1e-5)  # tau=0.01, lr=0.5: far from the target, but shown
    assert image.get_array()[1, 1] == pytest.approx(1e-10)
    assert "final grad_norm_sq" in grad_ax.get_title() and "rounds until" in rounds_ax.get_title()
    assert (tmp_path / "h.png").stat().st_size > 5000


def test_sweep_heat_maps_share_one_colour_scale_and_name_the_fixed_values(tmp_path, monkeypatch):
    import fl_clip21.sweep as sweep

    # Prepare: record every heat map's figure as it is drawn.
    figures = {}
    draw = sweep.plot_heatmap

    def spy(rows, grid, path, *args):
        figures[path.name] = draw(rows, grid, path, *args)
        return figures[path.name]

    monkeypatch.setattr(sweep, "plot_heatmap", spy)
    cells = sweep.resolve_cells(MEAN, {"tau": ["0.1", "1"]}, {"rounds": "20"})
    rows = sweep.run_sweep(cells, stream=io.StringIO())
    # Execute
    sweep.write_sweep(tmp_path, rows, {"tau": ["0.1", "1"]}, cells[0][1][0], seeds=1, max_rounds=20)
    # Assert
    assert sorted(figures) == ["heatmap-clip-gd.png", "heatmap-clip21-gd.png", "heatmap-gd.png"]
    scales = {(f.axes[1].images[0].norm.vmin, f.axes[1].images[0].norm.vmax) for f in figures.values()}
    assert len(scales) == 1
    title = figures["heatmap-clip-gd.png"].texts[0].get_text()  # the suptitle
    assert title.startswith("clip-gd: mean-estimation — ") and "n=3" in title and "γ=0.5" in title
    assert "τ" not in title  # the grid varies tau


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [io.StringIO(), _Terminal()], ids=["log", "terminal"])
def test_a_batched_sweep_shows_its_rounds_while_a_batch_runs(stream):
    import fl_clip21.sweep as sweep

    cells = sweep.resolve_cells(MEAN, {"tau": ["0.1", "1"]}, {"rounds": "20", "algorithms": "clip21-gd"})
    sweep.run_sweep(cells, stream=stream)
    text = stream.getvalue()
    if isinstance(stream, _Terminal):  # one line, rewritten in place every round, ended at the last
        assert text.count("\r\033[K") == 20 and "round 1/20" in text
        assert "sweep batch 1/1 (2 runs of clip21-gd): round 20/20" in text.split("\n")[0]
    else:  # a line every tenth of the rounds
        lines = [ln for ln in text.splitlines() if ln.startswith("sweep batch")]
        assert [ln.split(": ")[1].split()[1] for ln in lines] == [f"{k}/20" for k in range(2, 21, 2)]
    assert "sweep [2/2]" in text  # then the cells' lines, as before
