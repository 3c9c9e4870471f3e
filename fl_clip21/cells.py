"""Many runs in one batch: the cells of a sweep that share a problem, as cells x clients rows.

A sweep's cells often differ only in hyper-parameters (tau, lr, beta1, beta2,
sigma). Such cells share the problem and the algorithm's update rule, so all
their clients can be one batch: C cells of n clients are C x n rows of the
stacked client state, each row with its own cell's hyper-parameters (an (m,)
array per key) and its own cell's model as its point. A round runs the
algorithm's client function once on every sampled row of every cell; the
server step runs per cell on (d,) vectors, the evaluation of every cell in one
batched call, whose per-client gradients a full-batch algorithm's next round
reads (as :func:`fl_clip21.engine.run_local` does). Each cell's
trajectory is the one :func:`fl_clip21.engine.run_local` gives it alone (the
random streams are per client, not per batch), to float rounding, on the
cells' ``device`` (fl_clip21.backend) as on numpy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fl_clip21 import backend, streams
from fl_clip21.algorithms import algorithm_from_config
from fl_clip21.config import ConfigError
from fl_clip21.engine import drops_possible, late_rows, metrics_many, sample_clients, server_noise
from fl_clip21.fault_protocol import batch_record, new_copies, norm_quantiles_by_group, reports_norms, settle_rows
from fl_clip21.problems import Minibatch, build_problem

# Keys a cell of a batch may have of its own: hyper-parameters every update rule takes per row.
ROW_KEYS = ("lr", "tau", "beta1", "beta2", "sigma", "target-epsilon")
OnCell = Callable[[int, str, dict[str, Any], int], None]  # (cell index, algorithm, record, rounds)


def batch_key(cfg: dict[str, Any], name: str) -> str:
    """Cells with the same key run in one batch: everything but the per-row hyper-parameters, and the state names."""
    import json

    algorithm = algorithm_from_config(name, cfg)
    shared = {k: v for k, v in cfg.items() if k not in ROW_KEYS and k != "name"}
    return json.dumps([name, shared, algorithm.client_state], sort_keys=True, default=str)


def run_cells(
    cfgs: list[dict[str, Any]], name: str, on_round: OnCell | None = None, evaluate_every: int = 1,
) -> list[dict[str, Any]]:
    """Algorithm ``name`` of every cell of ``cfgs`` (one :func:`batch_key`) in one batch; a result per cell.

    The models are evaluated (loss, grad_norm_sq, accuracy in the records) every
    ``evaluate_every`` rounds and after the last; the trajectories do not
    depend on it (no update reads an evaluation), so a caller that reads only
    the final metrics (``fl-clip21 tune``) skips the others' cost.
    """
    keys = {batch_key(c, name) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"run_cells needs cells that differ only in {', '.join(ROW_KEYS)}, got {len(keys)} kinds")
    cfg0 = cfgs[0]
    if cfg0.get("secure-noise", False):
        raise ConfigError(
            "secure-noise=true draws the noise from OS entropy, but batched sweeps and tune compare cells on "
            "seeds: run them with secure-noise=false (a simulation's seeded noise)"
        )
    xp = backend.get(cfg0.get("device", "numpy"))
    problem = build_problem(cfg0, xp.name)
    algorithms = [algorithm_from_config(name, c) for c in cfgs]
    algorithm = algorithms[0]
    n, C, layout = cfg0["num-clients"], len(cfgs), problem.layout
    d, dtype = layout.size, layout.dtype
    x = xp.asarray(np.tile(layout.flatten(problem.init_params()), (C, 1)))
    servers = [algorithm.server_init(d, dtype, xp) for _ in range(C)]
    state = algorithm.client_init(C * n, d, dtype, xp)  # row c * n + i: client i of cell c
    copies = new_copies(algorithm, C * n, d, dtype, xp, drops_possible(cfg0))
    # Per row: the hyper-parameters the cells vary; the others are the batch's.
    hyper = {k: np.array([a.hyper[k] for a in algorithms], dtype=np.float64) for k in algorithm.hyper if k in ROW_KEYS}
    times_asked = np.zeros((C, n), dtype=np.int64)
    records: list[list[dict[str, Any]]] = [[] for _ in range(C)]
    stochastic = cfg0["batch-size"] if algorithm.stochastic else None
    reports = [reports_norms(a) for a in algorithms]
    cached = None  # every row's full gradient at its cell's model, from the last evaluation (full batch)
    # Every client every round: the batch's rows, drawn once (no sampling per round).
    full = cfg0["fraction"] >= 1 and cfg0.get("availability", 1.0) >= 1
    all_arrive = not drops_possible(cfg0)
    start = time.perf_counter()
    for k in range(1, cfg0["rounds"] + 1):
        t0 = time.perf_counter()
        if k == 1 or not full:
            clients = np.asarray(sample_clients(cfg0["seed"], k, n, cfg0["fraction"], cfg0.get("availability", 1.0),
                                                cfg0.get("sampling") == "poisson"), dtype=np.int64)
            # Rows are grouped by cell: cell c's are the slice cells[c] of the batch (views, not gathers).
            m = len(clients)
            cell_of_row = np.repeat(np.arange(C), m)
            client_of_row = np.tile(clients, C)
            index = cell_of_row * n + client_of_row
            everyone = m == n  # then the rows are the state arrays themselves, in order
            rows = xp.asarray(index)
            cells = [slice(c * m, (c + 1) * m) for c in range(C)]
            hp = {**algorithm.hyper, **{key: values[cell_of_row] for key, values in hyper.items()}}
            cell_rows = xp.asarray(cell_of_row)
            every_row = np.ones(len(index), dtype=bool)
        times_asked[:, clients] += 1

        def grads(points: np.ndarray, step: int, cached=cached, rows=rows, everyone=everyone) -> np.ndarray:
            batch = Minibatch(cfg0["seed"], k, stochastic, step) if stochastic else None
            if points is at_cells and cached is not None:
                return cached if everyone else cached[rows]
            if points is at_cells:  # every row at its cell's model: C distinct points
                return problem.grads(x, client_of_row, batch, point_of_row=cell_of_row)
            return problem.grads(points, client_of_row, batch)

        def noise(step: int) -> np.ndarray:
            return xp.cast(xp.normals(cfg0["seed"], streams.NOISE, client_of_row, k, d, step), dtype)

        at_cells = x[cell_rows]
        out = algorithm.client_round(
            at_cells, {s: v if everyone else v[rows] for s, v in state.items()}, grads, noise, hp
        )
        cached = None  # the round may have written into it
        arrived = every_row if all_arrive else ~late_rows(cfg0, k, client_of_row)
        for s, v in out.state.items():
            if not everyone:
                state[s][rows] = v
            elif v is not state[s]:
                state[s][...] = v
        memory = state[algorithm.memory] if algorithm.memory is not None else None
        settle_rows(memory, copies, index, out.messages, arrived)
        for c, mine in enumerate(cells):
            # A cell's messages are a view of its rows when all of them came in (a gather otherwise).
            messages = out.messages[mine] if all_arrive else out.messages[mine][xp.asarray(arrived[mine])]
            x[c], servers[c] = algorithms[c].server_round(
                x[c], servers[c], messages, n, noise=server_noise(cfg0["seed"], k, d, xp)
            )
        evaluated = k % evaluate_every == 0 or k == cfg0["rounds"]
        evaluations = problem.evaluate_many(x, client_grads=stochastic is None) if evaluated else None
        if evaluations is not None and stochastic is None and all(ev.client_grads is not None for ev in evaluations):
            cached = evaluations[0].client_grads if C == 1 else xp.concatenate([ev.client_grads for ev in evaluations])
        active, norms = xp.to_numpy(out.active), xp.to_numpy(out.norms)
        summaries = metrics_many(evaluations) if evaluations is not None else None
        quantiles = norm_quantiles_by_group(norms[arrived], cell_of_row[arrived], C) if any(reports) else None
        seconds = time.perf_counter() - t0
        for c, mine in enumerate(cells):
            rec = batch_record(
                k, algorithms[c], applied=arrived[mine], active=active[mine], norms=None, d=d, dtype=dtype,
                seconds=seconds / C, times_asked=times_asked[c], delta=cfgs[c]["delta"],
                quantiles=quantiles[c] if reports[c] else None,
            )
            if summaries is not None:
                rec.update(summaries[c])
            records[c].append(rec)
            if on_round is not None:
                on_round(c, name, rec, cfg0["rounds"])
    wall = time.perf_counter() - start
    return [
        {"records": records[c], "params": layout.unflatten(xp.to_numpy(x[c])), "wall_seconds": wall / C}
        for c in range(C)
    ]
