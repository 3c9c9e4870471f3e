"""``fl-clip21 bench --engines``: the batched engine against the memory-bandwidth bound and a per-client loop.

At each point (clients n, model size d) on logistic regression with synthetic
data, and for the digits MLP, in one process with one BLAS thread
(threadpoolctl), repeated (min and median reported):

- **batched**: a round of clip21-gd with its evaluation, as ``--engine
  vectorized`` runs it (:func:`fl_clip21.engine.run_local`): the wall time between
  consecutive rounds' records, the first round left out (it computes the
  gradients the later rounds read from the evaluation);
- **bound**: a numpy copy of the bytes a round must move at least, the data
  read once and the clients' memories V read and written once: a copy of
  ``X.nbytes + V.nbytes`` bytes reads and writes that many;
- **loop**: the same round with one Python call per client per round (its
  gradient, its update, as the engine before the batched core did: a batch of
  one each), and the evaluation.

Each point prints ms per round, us per client-round and the ratios
batched / bound and loop / batched. Then a 60-run sweep (20 cells x 3
algorithms of logreg-nonconvex, 100 rounds): runs per second batched
(:mod:`fl_clip21.cells`) and one run at a time.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import numpy as np

from fl_clip21.algorithms import algorithm_from_config
from fl_clip21.config import resolve
from fl_clip21.engine import batch_grads, batch_noise, run_local
from fl_clip21.problems import build_problem

def logreg_config(n: int, d: int, rounds: int) -> dict[str, Any]:
    """clip21-gd on synthetic logistic regression: d - 1 features, 2n rows (at least 1000), label-sorted."""
    return resolve({
        "algorithms": ["clip21-gd"], "rounds": rounds, "lr": 1.0, "tau": 0.1, "num-clients": n, "seed": 0,
        "problem": {"name": "logreg", "dataset": "synthetic", "rows": max(2 * n, 1000), "features": d - 1},
        "partition": {"kind": "label-sorted"},
    })


def mlp_config(n: int, rounds: int) -> dict[str, Any]:
    """clip21-gd on the digits MLP (64-32-10), iid."""
    return resolve({
        "algorithms": ["clip21-gd"], "rounds": rounds, "lr": 0.5, "tau": 0.5, "num-clients": n, "seed": 0,
        "problem": {"name": "mlp", "hidden": 32},
    })


def _batched_round_seconds(cfg: dict[str, Any], rounds: int) -> list[float]:
    stamps: list[float] = []
    run_local({**cfg, "rounds": rounds + 1}, "clip21-gd", lambda *_: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _loop_round_seconds(cfg: dict[str, Any], rounds: int) -> list[float]:
    """Rounds of clip21-gd with one Python call per client (a batch of one each), then the evaluation."""
    problem, algorithm = build_problem(cfg), algorithm_from_config("clip21-gd", cfg)
    layout, n = problem.layout, cfg["num-clients"]
    x = layout.flatten(problem.init_params())
    server = algorithm.server_init(layout.size, layout.dtype)
    v = layout.zeros(n)
    times = []
    for k in range(1, rounds + 1):
        t0 = time.perf_counter()
        messages = layout.zeros(n)
        for i in range(n):
            one = np.array([i])
            out = algorithm.client_round(
                x, {"v": v[i : i + 1]}, batch_grads(problem, algorithm, cfg, one, k),
                batch_noise(cfg, one, k, layout.size, layout.dtype),
            )
            v[i], messages[i] = out.state["v"][0], out.messages[0]
        x, server = algorithm.server_round(x, server, messages, n)
        problem.evaluate(x)
        times.append(time.perf_counter() - t0)
    return times


def _copy_seconds(nbytes: int, repeats: int) -> list[float]:
    src = np.ones(max(1, nbytes // 8))
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return times


def _summary(seconds: list[float]) -> dict[str, float]:
    return {"min_ms": 1e3 * min(seconds), "median_ms": 1e3 * statistics.median(seconds)}


def bench_point(cfg: dict[str, Any], rounds: int, repeats: int, loop: bool = True) -> dict[str, Any]:
    """One point: batched, bound (and loop) ms per round, min and median over ``repeats`` x ``rounds``."""
    problem = build_problem(cfg)
    n, d = cfg["num-clients"], problem.layout.size
    data = problem.X.nbytes if hasattr(problem, "X") else 0
    memories = n * d * problem.layout.dtype.itemsize
    batched = [s for _ in range(repeats) for s in _batched_round_seconds(cfg, rounds)]
    bound = _copy_seconds(data + memories, repeats * rounds)
    row: dict[str, Any] = {
        "problem": cfg["problem.name"], "clients": n, "d": d, "bytes_moved": data + memories,
        "batched": _summary(batched), "bound": _summary(bound),
        "batched_us_per_client_round": 1e6 * statistics.median(batched) / n,
    }
    row["batched_over_bound"] = row["batched"]["median_ms"] / row["bound"]["median_ms"]
    if loop:
        looped = [s for _ in range(repeats) for s in _loop_round_seconds(cfg, max(1, rounds // 2))]
        row["loop"] = _summary(looped)
        row["loop_over_batched"] = row["loop"]["median_ms"] / row["batched"]["median_ms"]
    return row


def line(row: dict[str, Any]) -> str:
    loop = (
        f"  loop {row['loop']['median_ms']:9.2f} ms ({row['loop_over_batched']:5.1f}x slower)" if "loop" in row else ""
    )
    return (
        f"{row['problem']:>7} n={row['clients']:>6} d={row['d']:>6}: batched {row['batched']['median_ms']:9.2f} ms "
        f"(min {row['batched']['min_ms']:.2f}), {row['batched_us_per_client_round']:8.2f} us/client-round; "
        f"bound {row['bound']['median_ms']:8.2f} ms ({row['batched_over_bound']:5.2f}x){loop}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| problem | n | d | batched ms/round (median, min) | us/client-round | bound ms | batched / bound | "
        "per-client loop ms | loop / batched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loop = (f"{r['loop']['median_ms']:.2f}", f"{r['loop_over_batched']:.1f}x") if "loop" in r else ("-", "-")
        out.append(
            f"| {r['problem']} | {r['clients']} | {r['d']} | {r['batched']['median_ms']:.2f} ({r['batched']['min_ms']:.2f}) "
            f"| {r['batched_us_per_client_round']:.2f} | {r['bound']['median_ms']:.2f} | {r['batched_over_bound']:.2f}x "
            f"| {loop[0]} | {loop[1]} |"
        )
    return "\n".join(out)


SWEEP_GRID = ["tau=0.003,0.01,0.03,0.1,0.3,1,3,10,30,100", "lr=0.3,1"]  # 20 cells x 3 algorithms = 60 runs


def bench_sweep(repeats: int) -> dict[str, Any]:
    """Cell-runs per second of a 60-cell sweep of logreg-nonconvex (100 rounds): batched, and one run at a time."""
    import io
    from pathlib import Path

    from fl_clip21.engine import run_vectorized
    from fl_clip21.sweep import parse_grid, resolve_cells, run_sweep

    scenario = Path(__file__).resolve().parent.parent / "scenarios" / "logreg-nonconvex.toml"
    cells = resolve_cells(scenario, parse_grid(SWEEP_GRID), {})
    runs = sum(len(r) * len(r[0]["algorithms"]) for _, r in cells)
    build_problem(cells[0][1][0])
    batched, single = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_sweep(cells, "vectorized", io.StringIO())
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _, cell_runs in cells:
            for cfg in cell_runs:
                run_vectorized(cfg)
        single.append(time.perf_counter() - t0)
    return {
        "grid": SWEEP_GRID, "cell_runs": runs, "batched": _summary(batched), "one_at_a_time": _summary(single),
        "batched_cell_runs_per_second": runs / statistics.median(batched),
        "one_at_a_time_over_batched": statistics.median(single) / statistics.median(batched),
    }


def run_engine_bench(
    points: list[tuple[int, int]], mlp_clients: list[int], rounds: int, repeats: int, loop_limit: int = 10000,
    sweep: bool = True,
) -> dict[str, Any]:
    """Every point, then the sweep (unless ``sweep`` is False); prints a line each.

    The per-client loop runs up to ``loop_limit`` clients.
    """
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(limits=1):
        for n, d in points:
            rows.append(bench_point(logreg_config(n, d, rounds), rounds, repeats, loop=n <= loop_limit))
            print(line(rows[-1]), flush=True)
        for n in mlp_clients:
            rows.append(bench_point(mlp_config(n, rounds), rounds, repeats))
            print(line(rows[-1]), flush=True)
        swept = bench_sweep(repeats) if sweep else None
    if swept is not None:
        print(
            f"sweep of {swept['cell_runs']} runs: batched {swept['batched']['median_ms'] / 1e3:.2f} s "
            f"({swept['batched_cell_runs_per_second']:.0f} runs/s), one at a time "
            f"{swept['one_at_a_time']['median_ms'] / 1e3:.2f} s ({swept['one_at_a_time_over_batched']:.1f}x slower)",
            flush=True,
        )
    return {
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "blas_threads": 1,
        },
        "rounds": rounds, "repeats": repeats, "results": rows, "sweep": swept,
    }
