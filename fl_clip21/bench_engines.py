"""``fl-clip21 bench --engines``: the batched engine against the memory-bandwidth bound and a per-client loop.

At each point (clients n, model size d) on logistic regression with synthetic
data, and for the digits MLP, in one process with one BLAS thread
(threadpoolctl), repeated (min and median reported):

- **batched**: a round of clip21-gd with its evaluation, as ``--engine
  vectorized`` runs it (:func:`fl_clip21.engine.run_local`) on numpy: the wall
  time between consecutive rounds' records, the first round left out (it
  computes the gradients the later rounds read from the evaluation);
- **bound**: the time of the bytes a round must move at least: the data read
  once (``D``: logreg's design matrix X in float64, the MLP's training features
  in float32) and the clients' memories V (n x d in the model's dtype) read and
  written once, ``D + 2 V`` bytes in all. It is timed as one numpy copy of
  ``D / 2 + V`` bytes, which reads that many and writes that many;
- **numpy only** (where numba is installed): the same batched round with
  the compiled loops of fl_clip21.kernels turned off, numpy's calls only;
- **loop**: today's functions called once per client per round (its gradient,
  its update: a batch of one each), then the evaluation. It is a proxy of the
  per-client structure, not the previous engine: the engine before the batched
  core (commit c0aab56) also built a generator per client per round, held each
  client's state in a dict of arrays and evaluated with a gradient per client;
  it is not in this code base, and its figures (measured apart, dated) are in
  docs/benchmarks.md.

With ``device`` (``cpu``, ``cuda``, or ``auto``: cuda where torch sees a GPU,
else cpu) each point also runs the batched round on torch on that device
(``device=...``, fl_clip21.backend), with the device's own bound (a torch copy
of the same bytes on it), the device synchronised before every clock reading;
torch on the CPU runs one thread, as numpy's BLAS does.

Each point prints ms per round, us per client-round and the ratios
batched / bound and loop / batched (the per-client-loop proxy's, not the
previous engine's). Then a 60-run sweep (20 cells x 3
algorithms of logreg-nonconvex, 100 rounds): runs per second batched
(:mod:`fl_clip21.cells`) and one run at a time.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from typing import Any

import numpy as np

from fl_clip21 import backend, kernels
from fl_clip21.algorithms import algorithm_from_config
from fl_clip21.config import ConfigError, resolve
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


def _batched_round_seconds(cfg: dict[str, Any], rounds: int, xp: backend.Backend = backend.NUMPY) -> list[float]:
    stamps: list[float] = []

    def stamp(*_: Any) -> None:
        xp.synchronize()
        stamps.append(time.perf_counter())

    run_local({**cfg, "rounds": rounds + 1, "device": xp.name}, "clip21-gd", stamp)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _loop_round_seconds(cfg: dict[str, Any], rounds: int) -> list[float]:
    """Rounds of clip21-gd with one Python call per client (a batch of one each), then the evaluation.

    A proxy of a per-client engine on today's functions, not the previous engine (c0aab56).
    """
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


def _copy_seconds(nbytes: int, repeats: int, xp: backend.Backend = backend.NUMPY) -> list[float]:
    """Seconds of copies of ``nbytes`` bytes (float64s) on ``xp``'s memory."""
    src = xp.asarray(np.ones(max(1, nbytes // 8)))
    dst = xp.copy(src)
    times = []
    for _ in range(repeats):
        xp.synchronize()
        t0 = time.perf_counter()
        dst[...] = src
        xp.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def round_bytes(problem: Any, n: int) -> tuple[int, int]:
    """(D, V): the bytes of the data a round reads once, and of the clients' memories it reads and writes once."""
    data = getattr(problem, "Xtr", None)  # the MLP computes on its float32 tensor
    data = problem.X if data is None else data
    return int(data.nbytes), n * problem.layout.size * problem.layout.dtype.itemsize


def _summary(seconds: list[float]) -> dict[str, float]:
    return {"min_ms": 1e3 * min(seconds), "median_ms": 1e3 * statistics.median(seconds)}


def _device_point(
    cfg: dict[str, Any], rounds: int, repeats: int, xp: backend.Backend, half_bytes: int, numpy_median: float
) -> dict[str, Any]:
    """The batched round on torch on ``xp``'s device, and that device's bound."""
    batched = [s for _ in range(repeats) for s in _batched_round_seconds(cfg, rounds, xp)]
    out: dict[str, Any] = {
        "device": xp.name, "batched": _summary(batched), "bound": _summary(_copy_seconds(half_bytes, repeats * rounds, xp)),
        "batched_us_per_client_round": 1e6 * statistics.median(batched) / cfg["num-clients"],
    }
    out["batched_over_bound"] = out["batched"]["median_ms"] / out["bound"]["median_ms"]
    out["numpy_over_device"] = 1e3 * numpy_median / out["batched"]["median_ms"]
    return out


def bench_point(
    cfg: dict[str, Any], rounds: int, repeats: int, loop: bool = True, device: backend.Torch | None = None
) -> dict[str, Any]:
    """One point: batched, bound (and loop, and the device's) ms per round, min and median over ``repeats`` x ``rounds``."""
    problem = build_problem(cfg)
    n, d = cfg["num-clients"], problem.layout.size
    data, memories = round_bytes(problem, n)
    half = data // 2 + memories  # a copy of these bytes reads D + 2V / 2 and writes as many
    batched = [s for _ in range(repeats) for s in _batched_round_seconds(cfg, rounds)]
    bound = _copy_seconds(half, repeats * rounds)
    row: dict[str, Any] = {
        "problem": cfg["problem.name"], "clients": n, "d": d, "data_bytes": data, "memory_bytes": memories,
        "bytes_moved": data + 2 * memories, "batched": _summary(batched), "bound": _summary(bound),
        "batched_us_per_client_round": 1e6 * statistics.median(batched) / n,
    }
    row["batched_over_bound"] = row["batched"]["median_ms"] / row["bound"]["median_ms"]
    if kernels.ENABLED:  # the same round without the compiled loops (fl_clip21.kernels), in this process
        with kernels.switched(False):
            plain = [s for _ in range(repeats) for s in _batched_round_seconds(cfg, rounds)]
        row["numpy_only"] = _summary(plain)
        row["numpy_only_over_batched"] = row["numpy_only"]["median_ms"] / row["batched"]["median_ms"]
    if loop:
        looped = [s for _ in range(repeats) for s in _loop_round_seconds(cfg, max(1, rounds // 2))]
        row["loop"] = _summary(looped)
        row["loop_over_batched"] = row["loop"]["median_ms"] / row["batched"]["median_ms"]
    if device is not None:
        row["device"] = _device_point(cfg, rounds, repeats, device, half, statistics.median(batched))
    return row


def line(row: dict[str, Any]) -> str:
    loop = (
        f"  per-client-loop proxy {row['loop']['median_ms']:9.2f} ms ({row['loop_over_batched']:5.1f}x slower)" if "loop" in row else ""
    )
    plain = (
        f"  numpy only {row['numpy_only']['median_ms']:9.2f} ms ({row['numpy_only_over_batched']:4.2f}x)"
        if "numpy_only" in row else ""
    )
    dev = row.get("device")
    device = (
        f"  torch-{dev['device']} {dev['batched']['median_ms']:9.2f} ms (min {dev['batched']['min_ms']:.2f}; "
        f"bound {dev['bound']['median_ms']:.2f} ms, {dev['batched_over_bound']:5.2f}x; "
        f"numpy / torch {dev['numpy_over_device']:.2f})" if dev else ""
    )
    return (
        f"{row['problem']:>7} n={row['clients']:>6} d={row['d']:>6}: batched {row['batched']['median_ms']:9.2f} ms "
        f"(min {row['batched']['min_ms']:.2f}), {row['batched_us_per_client_round']:8.2f} us/client-round; "
        f"bound {row['bound']['median_ms']:8.2f} ms ({row['batched_over_bound']:5.2f}x){plain}{loop}{device}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """The points as a Markdown table; with a device, its columns after numpy's."""
    device = next((r["device"]["device"] for r in rows if "device" in r), None)
    head = (
        "| problem | n | d | batched ms/round (median, min) | us/client-round | bound ms | batched / bound | "
        "numpy-only ms (median) | numpy-only / batched | per-client-loop proxy ms | proxy / batched |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|---|"
    if device:
        head += f" torch-{device} ms/round (median, min) | torch-{device} bound ms | torch / bound | numpy / torch |"
        rule += "---|---|---|---|"
    out = [head, rule]
    for r in rows:
        loop = (f"{r['loop']['median_ms']:.2f}", f"{r['loop_over_batched']:.1f}x") if "loop" in r else ("-", "-")
        plain = (
            (f"{r['numpy_only']['median_ms']:.2f}", f"{r['numpy_only_over_batched']:.2f}x") if "numpy_only" in r
            else ("-", "-")
        )
        text = (
            f"| {r['problem']} | {r['clients']} | {r['d']} | {r['batched']['median_ms']:.2f} ({r['batched']['min_ms']:.2f}) "
            f"| {r['batched_us_per_client_round']:.2f} | {r['bound']['median_ms']:.2f} | {r['batched_over_bound']:.2f}x "
            f"| {plain[0]} | {plain[1]} | {loop[0]} | {loop[1]} |"
        )
        if device:
            dev = r["device"]
            text += (
                f" {dev['batched']['median_ms']:.2f} ({dev['batched']['min_ms']:.2f}) | {dev['bound']['median_ms']:.3f} "
                f"| {dev['batched_over_bound']:.2f}x | {dev['numpy_over_device']:.2f}x |"
            )
        out.append(text)
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


def bench_device(name: str) -> backend.Torch:
    """The torch backend of ``--device``: cpu, cuda, or auto (cuda where torch sees a GPU, else cpu)."""
    if name == "auto":
        name = "cpu" if backend.cuda_problem() else "cuda"
    elif name == "cuda" and backend.cuda_problem():
        raise ConfigError(f"--device cuda needs a CUDA GPU, but {backend.cuda_problem()}; use --device auto or cpu")
    return backend.get(name)


def run_engine_bench(
    points: list[tuple[int, int]], mlp_clients: list[int], rounds: int, repeats: int, loop_limit: int = 10000,
    sweep: bool = True, device: str | None = None,
) -> dict[str, Any]:
    """Every point, then the sweep (unless ``sweep`` is False); prints a line each.

    The per-client loop runs up to ``loop_limit`` clients. With ``device``
    (:func:`bench_device`), every point also on torch on that device.
    """
    from threadpoolctl import threadpool_limits

    xp = bench_device(device) if device else None
    rows = []
    with threadpool_limits(limits=1), _torch_threads(1):
        for n, d in points:
            rows.append(bench_point(logreg_config(n, d, rounds), rounds, repeats, loop=n <= loop_limit, device=xp))
            print(line(rows[-1]), flush=True)
        for n in mlp_clients:
            rows.append(bench_point(mlp_config(n, rounds), rounds, repeats, loop=n <= loop_limit, device=xp))
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
            "kernels": kernels.name(), **_torch_machine(xp),
        },
        "rounds": rounds, "repeats": repeats, "results": rows, "sweep": swept,
    }


@contextlib.contextmanager
def _torch_threads(count: int):
    """torch's intra-op threads set to ``count`` (as numpy's BLAS is) while the bench runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_machine(xp: backend.Torch | None) -> dict[str, Any]:
    if xp is None:
        return {}
    torch = xp.torch
    gpu = torch.cuda.get_device_name(xp.device) if xp.device.type == "cuda" else None
    return {"torch": torch.__version__, "device": xp.name, "gpu": gpu, "torch_threads": 1}
