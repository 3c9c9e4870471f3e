"""ServerApp side: run every algorithm of a scenario on a Flower Grid."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fl_clip21.algorithms import algorithm_from_config
from fl_clip21.flower import records as R
from fl_clip21.flower.strategy import Clip21Strategy
from fl_clip21.engine import evaluate
from fl_clip21.problems import build_problem

# on_round(algorithm, record, rounds) is called after every round, for progress displays.
OnRound = Callable[[str, dict[str, Any], int], None]


def run_algorithm(
    grid: Grid, cfg: dict[str, Any], name: str, on_round: OnRound | None = None, timeout: float = 3600.0
) -> dict[str, Any]:
    """Run one algorithm for ``cfg['rounds']`` rounds; returns its records and final model."""
    problem = build_problem(cfg)
    strategy = Clip21Strategy(
        algorithm=algorithm_from_config(name, cfg),
        scenario=cfg,
        num_clients=cfg["num-clients"],
        fraction=cfg["fraction"],
        seed=cfg["seed"],
        audit=cfg["audit"],
        delta=cfg["delta"],
    )
    evals: dict[int, dict[str, float]] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        metrics = evaluate(problem, R.from_record(arrays))
        evals[server_round] = metrics
        if on_round is not None:
            on_round(name, {**strategy.history[-1], **metrics}, cfg["rounds"])
        return MetricRecord(metrics)

    start = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=R.to_record(problem.init_params()),
        num_rounds=cfg["rounds"],
        timeout=timeout,
        evaluate_fn=evaluate_fn,
    )
    records = [{**rec, **evals[rec["round"]]} for rec in strategy.history]
    return {
        "records": records,
        "params": strategy.params,
        "wall_seconds": time.perf_counter() - start,
    }


def run_scenario(grid: Grid, cfg: dict[str, Any], on_round: OnRound | None = None) -> dict[str, dict]:
    """Run every algorithm the scenario lists, one after the other, on ``grid``."""
    from fl_clip21.flower import dp_baseline

    results = {}
    for name in cfg["algorithms"]:
        if name == dp_baseline.NAME:
            results[name] = dp_baseline.run_flower_dp(grid, cfg, on_round)
        else:
            results[name] = run_algorithm(grid, cfg, name, on_round)
    return results
