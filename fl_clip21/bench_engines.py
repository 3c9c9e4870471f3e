"""``fl-clip21 bench --engines``: seconds per round, vectorized engine vs Flower's simulation engine.

Both engines run the same algorithm on the same scenario in this process, one
after the other, with the problem's data loaded beforehand. A round is timed
from one round's end (after the global evaluation) to the next, so set-up
(Ray, the Flower nodes, the handshake) and the first round, which warms up
the Flower nodes, are left out: ``rounds + 1`` rounds run, ``rounds`` are timed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fl_clip21.bench import DEFAULT_SCENARIO
from fl_clip21.config import load_scenario, parse_sets
from fl_clip21.problems import build_problem


def _timed(run) -> tuple[float, dict[str, Any]]:
    """Seconds per round after the first of ``run(on_round)``, and its result."""
    stamps: list[float] = []
    result = run(lambda name, rec, rounds: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), result


def bench_engines(
    clients: int = 100, rounds: int = 10, scenario: Path = DEFAULT_SCENARIO, algorithm: str = "clip21-gd"
) -> dict[str, Any]:
    """Seconds per round of ``algorithm`` on both engines at ``clients`` clients, and their ratio."""
    if clients < 1 or rounds < 1:
        raise ValueError(f"clients and rounds must be >= 1, got {clients!r} and {rounds!r}")
    from fl_clip21.engine import run_vectorized
    from fl_clip21.flower.simulation import simulate

    cfg = load_scenario(
        scenario, parse_sets([f"num-clients={clients}", f"rounds={rounds + 1}", f"algorithms={algorithm}"])
    )
    build_problem(cfg)
    # The vectorized engine first: Ray's processes linger a while after a simulation.
    vectorized_s, vectorized = _timed(lambda on_round: run_vectorized(cfg, on_round=on_round)[algorithm])
    flower_s, flower = _timed(lambda on_round: simulate(cfg, on_round=on_round)[algorithm])
    gap = max(float(abs(flower["params"][k] - vectorized["params"][k]).max()) for k in flower["params"])
    return {
        "scenario": str(scenario),
        "algorithm": algorithm,
        "clients": clients,
        "timed_rounds": rounds,
        "flower_seconds_per_round": flower_s,
        "vectorized_seconds_per_round": vectorized_s,
        "speedup": flower_s / vectorized_s,
        "flower_wall_seconds": flower["wall_seconds"],
        "vectorized_wall_seconds": vectorized["wall_seconds"],
        "max_param_difference": gap,
    }


def engines_line(row: dict[str, Any]) -> str:
    """One line of :func:`bench_engines`' figures."""
    return (
        f"{row['clients']:>6} clients, {row['algorithm']}, {row['timed_rounds']} timed rounds: "
        f"flower {row['flower_seconds_per_round']:.4f} s/round, "
        f"vectorized {row['vectorized_seconds_per_round']:.5f} s/round, "
        f"speed-up {row['speedup']:.0f}x (final models differ by {row['max_param_difference']:.1e})"
    )
