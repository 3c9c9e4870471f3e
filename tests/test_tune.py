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


# --- large grids: each distinct run once, batches within a memory budget ----------------------

STOCHASTIC = {"rounds": "6", "algorithms": "clip-sgd,clip21-sgd2m", "partition.kind": "iid", "batch-size": "8"}
BETAS = {"tau": ["0.03", "0.3"], "beta1": ["0.5", "1"], "beta2": ["0.1", "1"]}


@pytest.fixture()
def counted(monkeypatch):
    """The cells each call of the real run_cells ran, per algorithm."""
    import fl_clip21.tune as tune_module

    ran: dict[str, list[int]] = {}
    real = tune_module.run_cells

    def spy(cfgs, name, **kw):
        ran.setdefault(name, []).append(len(cfgs))
        return real(cfgs, name, **kw)

    monkeypatch.setattr(tune_module, "run_cells", spy)
    return ran


def test_cells_that_differ_only_in_keys_an_algorithm_does_not_take_run_once(counted):
    winners, scores = tune(SCENARIO, BETAS, STOCHASTIC, selection=[0], evaluation=[1], metric="final_loss")
    # clip-sgd takes no beta1, beta2: 2 distinct cells of 8 (then 1 evaluation run); clip21-sgd2m: all 8.
    assert sum(counted["clip-sgd"]) == 2 + 1 and sum(counted["clip21-sgd2m"]) == 8 + 1
    # The table is the one each cell's own run gives: a duplicate has its twin's score.
    for s in scores:
        cell = {k: s[k] for k in BETAS}
        own = run_local(expand_runs(load_scenario(SCENARIO, {**STOCHASTIC, **cell}))[0], s["algorithm"])
        assert s["final_loss"] == pytest.approx(own["records"][-1]["loss"], rel=1e-9), s
    assert len(scores) == 16
    sgd = [w for w in winners if w["algorithm"] == "clip-sgd"][0]
    assert not set(sgd["edge"]) & {"beta1", "beta2"}  # keys it does not take are never its edge


def test_the_chosen_cell_lists_only_the_keys_the_algorithm_reads():
    from fl_clip21.tune import markdown

    # beta2 is clip21-sgd2m's, local-steps dp-fedavg's: neither is clip-sgd's; rounds is every run's.
    grid = {"tau": ["0.1", "1"], "beta2": ["0.1", "1"], "local-steps": ["1", "2"], "rounds": ["3", "4"]}
    sets = {"algorithms": "clip-sgd,dp-fedavg", "partition.kind": "iid", "batch-size": "8"}
    winners, _ = tune(SCENARIO, grid, sets, selection=[0], evaluation=[1], metric="final_loss")
    cells = {w["algorithm"]: w["cell"] for w in winners}
    assert list(cells["clip-sgd"]) == ["tau", "rounds"]
    assert list(cells["dp-fedavg"]) == ["tau", "local-steps", "rounds"]
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown(winners, "final_loss", "t").splitlines()
            if line.startswith("| clip-sgd |") or line.startswith("| dp-fedavg |")}
    assert "beta2" not in rows["clip-sgd"] and "local-steps" not in rows["clip-sgd"]
    assert "beta2" not in rows["dp-fedavg"] and "local-steps=" in rows["dp-fedavg"]
    # The listed keys are the whole run: rerunning the shown cell alone gives the reported result.
    for w in winners:
        own = run_local(expand_runs(load_scenario(SCENARIO, {**sets, **w["cell"], "seeds": "1"}))[0], w["algorithm"])
        assert w["mean"] == pytest.approx(own["records"][-1]["loss"], rel=1e-9), w


def test_a_memory_budget_of_one_cell_gives_the_results_of_one_batch(counted):
    from fl_clip21.tune import cell_bytes

    one = cell_bytes(expand_runs(load_scenario(SCENARIO, {**STOCHASTIC, "beta1": "0.5"}))[0], "clip21-sgd2m")
    whole = tune(SCENARIO, BETAS, STOCHASTIC, selection=[0], evaluation=[1], metric="final_loss")
    # beta1 = 1 keeps no momentum: two batch kinds of 4 cells
    assert counted["clip21-sgd2m"][:2] == [4, 4]
    counted.clear()
    split = tune(SCENARIO, BETAS, STOCHASTIC, selection=[0], evaluation=[1], metric="final_loss", memory_budget=one)
    assert counted["clip21-sgd2m"][:8] == [1] * 8
    assert [w["cell"] for w in split[0]] == [w["cell"] for w in whole[0]]
    for a, b in zip(split[1], whole[1]):
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-9)


def test_cell_bytes_counts_every_clients_state_arrays():
    from fl_clip21.tune import cell_bytes

    cfg = expand_runs(load_scenario(SCENARIO, {"num-clients": "10", "partition.kind": "iid"}))[0]
    many = {**cfg, "num-clients": 100}
    # clip21-gd keeps v_i (one array of n x d), gd none: n x d x 8 B more, at any n.
    d = 31  # breast_cancer's 30 features and the bias
    assert cell_bytes(cfg, "clip21-gd") - cell_bytes(cfg, "gd") >= 10 * d * 8
    assert cell_bytes(many, "clip21-gd") > 9 * cell_bytes(cfg, "clip21-gd")


def test_progress_names_each_batch_and_a_budget_below_one_cell_is_refused():
    import io

    out = io.StringIO()
    tune(SCENARIO, {"tau": ["0.1", "1"]}, {"rounds": "3", "algorithms": "clip21-gd"}, selection=[0], evaluation=[1],
         metric="final_loss", memory_budget=10**9, stream=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("tune clip21-gd selection: batch 1/1, 2/2 distinct runs (2 asked)")
    assert lines[-1].startswith("tune clip21-gd evaluation: batch 1/1, 1/1 distinct runs (1 asked)")
    with pytest.raises(ConfigError, match="--memory-budget .* below"):
        tune(SCENARIO, {"tau": ["0.1"]}, {"rounds": "3", "algorithms": "clip21-gd"}, selection=[0], evaluation=[1],
             metric="final_loss", memory_budget=10)


@pytest.mark.parametrize("text,value", [("8GB", 8 * 10**9), ("512 MiB", 512 * 2**20), ("1e9", 10**9), ("100", 100)])
def test_memory_budget_sizes(text, value):
    from fl_clip21.tune import parse_bytes

    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "8 GBs", "-1GB", "0", "0.1"])
def test_a_bad_memory_budget_is_a_config_error_naming_it(text):
    from fl_clip21.tune import parse_bytes

    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_bytes(text)


def test_only_the_final_round_is_evaluated_and_it_is_the_full_run_s():
    from fl_clip21.cells import run_cells

    cfg = expand_runs(load_scenario(SCENARIO, {"rounds": "5", "algorithms": "clip21-gd"}))[0]
    every, final = run_cells([cfg], "clip21-gd")[0], run_cells([cfg], "clip21-gd", evaluate_every=5)[0]
    assert all("loss" in r for r in every["records"])
    assert [("loss" in r) for r in final["records"]] == [False] * 4 + [True]
    assert final["records"][-1]["loss"] == every["records"][-1]["loss"]
