"""``fl-clip21 sweep``: the grid, its CSV/Markdown/heat maps, and bad --grid input."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest

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
    rows = [{"tau": t, "algorithm": "x", "rounds_to_target": r} for t, r in zip(grid["tau"], (None, 12, 3))]
    plot_heatmap(rows, grid, tmp_path / "one-row.png", "1-D", max_rounds=20)
    never = [{**r, "rounds_to_target": None} for r in rows]
    plot_heatmap(never, grid, tmp_path / "never.png", "never", max_rounds=20)
    assert (tmp_path / "one-row.png").stat().st_size > 3000
    assert (tmp_path / "never.png").stat().st_size > 3000
