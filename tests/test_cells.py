"""Cells of a sweep in one batch (fl_clip21.cells): each cell's run is the one it gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_clip21.cells import batch_key, run_cells
from fl_clip21.config import load_scenario, parse_sets
from fl_clip21.engine import run_local

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "logreg-nonconvex.toml"


def _cells(name_sets, grid):
    return [load_scenario(SCENARIO, parse_sets([*name_sets, *cell])) for cell in grid]


@pytest.mark.parametrize("name, extra", [
    ("clip21-gd", []), ("clip-sgd", ["sigma=0.01"]), ("clip21-sgd2m", ["beta1=0.5", "sigma=0.01"]),
    ("celgc", ["local-steps=2"]), ("ef21-topk", ["topk=3"]),
    ("clip21-gd", ["fraction=1"]), ("clip21-topk", ["fraction=1", "topk=3"]),  # full participation: no gathers
    # late replies dropped (the rows that arrive are gathered per cell), and offline clients
    ("clip21-gd", ["straggler-fraction=0.4", "straggler-delay=0.01", "round-timeout=0.005", "availability=0.8"]),
    ("clip21-gd", ["fraction=1", "straggler-fraction=0.4", "straggler-delay=0.01", "round-timeout=0.005"]),
])
def test_every_cell_of_a_batch_has_the_trajectory_it_has_alone(name, extra):
    # Prepare: 4 cells that differ in tau, lr and beta2, partial participation.
    cfgs = _cells([f"algorithms={name}", "rounds=12", "fraction=0.5", *extra],
                  [[f"tau={t}", f"lr={lr}", f"beta2={b}"] for t, lr, b in ((0.05, 1.0, 1.0), (0.5, 0.3, 0.5),
                                                                         (0.1, 3.0, 0.8), (2.0, 0.5, 1.0))])
    # Execute
    batched = run_cells(cfgs, name)
    # Assert: the same records as each cell run alone
    for cfg, res in zip(cfgs, batched):
        alone = run_local(cfg, name)
        for a, b in zip(res["records"], alone["records"]):
            for key in ("loss", "grad_norm_sq", "accuracy", "clip_fraction", "accepted", "bytes_up", "update_norm_q50"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-15), (name, key, a["round"])


def test_cells_that_differ_in_more_than_hyper_parameters_are_refused():
    cfgs = _cells(["rounds=2"], [["tau=0.1"], ["num-clients=5"]])
    assert batch_key(cfgs[0], "clip21-gd") != batch_key(cfgs[1], "clip21-gd")
    with pytest.raises(ValueError, match="differ only in lr, tau"):
        run_cells(cfgs, "clip21-gd")


@pytest.mark.parametrize("name, calls", [("clip21-gd", 1), ("clip21-sgd", 4)])
def test_a_full_batch_batch_reads_its_gradients_from_the_evaluation_of_the_same_models(monkeypatch, name, calls):
    # Prepare: 3 cells, 4 rounds; count the problem's gradient calls.
    from fl_clip21.problems import build_problem

    cfgs = _cells([f"algorithms={name}", "rounds=4"], [["tau=0.1"], ["tau=1"], ["tau=10"]])
    problem = build_problem(cfgs[0])
    counted = []
    original = problem.grads
    monkeypatch.setattr(problem, "grads", lambda *a, **k: counted.append(1) or original(*a, **k))
    # Execute
    run_cells(cfgs, name)
    # Assert: round 1 computes them, later rounds of a full-batch algorithm read them; SGD draws every round
    assert len(counted) == calls
