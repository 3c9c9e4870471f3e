"""fl-clip21 tune: each algorithm at its best cell, chosen on selection seeds, evaluated on held-out ones."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from fl_clip21.config import ConfigError, expand_runs, load_scenario
from fl_clip21.engine import run_local
from fl_clip21.tune import tune

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "logreg-nonconvex.toml"


def test_the_winner_is_the_best_cell_on_the_selection_seeds_and_its_edge_is_flagged():
    grid = {"tau": ["0.01", "0.1"], "lr": ["0.3", "1"]}
    sets = {"rounds": "15", "algorithms": "clip-gd,clip21-gd", "partition.kind": "iid"}
    winners, scores = tune(SCENARIO, grid, sets, selection=[0], evaluation=[1, 2], metric="final_loss")
    assert [w["algorithm"] for w in winners] == ["clip-gd", "clip21-gd"] and len(scores) == 8
    for w in winners:
        mine = [s for s in scores if s["algorithm"] == w["algorithm"]]
        assert w["selection"] == min(s["final_loss"] for s in mine)
        # the evaluation is the chosen cell's own runs on the held-out seeds
        held = [run_local(expand_runs(load_scenario(SCENARIO, {**sets, **w["cell"], "seeds": str(s)}))[0],
                          w["algorithm"])["records"][-1]["loss"] for s in (1, 2)]
        assert w["mean"] == pytest.approx(sum(held) / 2, rel=1e-9)
        assert set(w["edge"]) <= {"tau", "lr"} and w["edge"]  # a 2-value grid: every choice is on an edge


def test_selection_and_evaluation_seeds_must_differ():
    with pytest.raises(ConfigError, match="must differ"):
        tune(SCENARIO, {"tau": ["0.1"]}, {}, selection=[0, 1], evaluation=[1], metric="final_loss")


def test_cli_tune_writes_the_table_and_exits_2_on_a_bad_metric(tmp_path):
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "fl_clip21.cli", "tune", str(SCENARIO), "--grid", "tau=0.1,1", "--set", "rounds=5",
           "--set", "algorithms=clip21-gd", "--eval-seeds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "tune.csv").open()))
    assert [r["algorithm"] for r in rows] == ["clip21-gd"] and (out / "tune.png").stat().st_size > 1000
    bad = subprocess.run([*cmd[:-2], "--metric", "speed", "--out", str(tmp_path / "u")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--metric must be one of" in bad.stderr and "Traceback" not in bad.stderr
