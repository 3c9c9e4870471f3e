"""What every engine shares: client sampling, per-client RNGs, one round.

``run_local`` runs a scenario's algorithm in this process, client after
client, with the same algorithm values, sampling and generators as the Flower
engine: it is the reference the Flower runs are checked against.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fl_clip21 import core
from fl_clip21.algorithms import Algorithm, algorithm_from_config
from fl_clip21.privacy import epsilon
from fl_clip21.problems import Problem, build_problem


def sample_clients(seed: int, server_round: int, num_clients: int, fraction: float) -> list[int]:
    """The client indices that take part in ``server_round`` (seeded, sorted)."""
    if fraction >= 1:
        return list(range(num_clients))
    m = max(1, int(round(fraction * num_clients)))
    rng = np.random.default_rng([seed, 0x5A3D1E, server_round])
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


def client_rng(seed: int, client: int, server_round: int) -> np.random.Generator:
    """The generator of client ``client`` in round ``server_round`` (reproducible)."""
    return np.random.default_rng([seed, client, server_round])


def client_round(
    algorithm: Algorithm, problem: Problem, cfg: dict[str, Any], client: int, server_round: int,
    params: core.Params, state: dict,
):
    """Client ``client``'s work in ``server_round``: the algorithm's client update."""
    batch = cfg["batch-size"] if algorithm.stochastic else None

    def grad_fn(p, rng):
        return problem.client_grad(client, p, rng if batch else None, batch)

    return algorithm.client_update(params, state, grad_fn, client_rng(cfg["seed"], client, server_round))


def message_bytes(algorithm: Algorithm, message: core.Params) -> int:
    """Bytes of values a message carries: dense arrays, or Top-k's int32 indices and values."""
    if algorithm.sparse:
        return sum(int(np.count_nonzero(v)) * (4 + v.itemsize) for v in message.values())
    return sum(int(v.nbytes) for v in message.values())


def round_epsilon(algorithm: Algorithm, times_asked: np.ndarray, delta: float) -> dict[str, float]:
    """``{"epsilon": ...}`` of the most-asked client, for algorithms with DP noise."""
    if algorithm.noise_multiplier is None:
        return {}
    return {"epsilon": epsilon(algorithm.noise_multiplier, int(times_asked.max()), delta)}


def evaluate(problem: Problem, params: core.Params) -> dict[str, float]:
    """Global metrics at ``params``: loss, grad_norm_sq (on all data), accuracy."""
    out = {"loss": problem.loss(params), "grad_norm_sq": core.global_norm(problem.grad(params)) ** 2}
    acc = problem.accuracy(params)
    if acc is not None:
        out["accuracy"] = acc
    return out


def run_local(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """Run algorithm ``name`` of scenario ``cfg`` in-process; same output as the Flower engine."""
    problem = build_problem(cfg)
    algorithm = algorithm_from_config(name, cfg)
    n = cfg["num-clients"]
    params = problem.init_params()
    server_state = algorithm.server_init(params)
    states = [algorithm.client_init(params) for _ in range(n)]
    records = []
    times_asked = np.zeros(n, dtype=np.int64)
    start = time.perf_counter()
    for k in range(1, cfg["rounds"] + 1):
        t0 = time.perf_counter()
        messages, clipped = [], 0
        clients = sample_clients(cfg["seed"], k, n, cfg["fraction"])
        times_asked[clients] += 1
        for i in clients:
            res = client_round(algorithm, problem, cfg, i, k, params, states[i])
            states[i] = res.state
            messages.append(res.message)
            clipped += res.clipped
        params, server_state = algorithm.server_update(params, server_state, messages, n)
        rec = {
            "round": k, "participants": len(clients), "accepted": len(messages),
            "clip_fraction": clipped / len(messages), "rejected": 0, "failed": 0,
            "bytes_up": sum(message_bytes(algorithm, m) for m in messages),
            "seconds": time.perf_counter() - t0,
            **round_epsilon(algorithm, times_asked, cfg["delta"]),
        }
        rec.update(evaluate(problem, params))
        records.append(rec)
    return {
        "records": records, "params": params, "server_state": server_state, "client_states": states,
        "wall_seconds": time.perf_counter() - start,
    }
