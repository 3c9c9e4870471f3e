"""What every engine shares: client sampling, per-client RNGs, one round.

``run_local`` runs a scenario's algorithm in this process with the same
algorithm values, sampling and generators as the Flower engine: it is the
reference the Flower runs are checked against. Each round it computes every
sampled client's gradient in one batched call (:func:`clients_round`), then
runs each client's update of the algorithm. ``run_vectorized`` runs every
algorithm of a scenario that way: the ``--engine vectorized`` of the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fl_clip21 import core
from fl_clip21.algorithms import FLOWER_BASELINES, Algorithm, ClientResult, GradFn, algorithm_from_config
from fl_clip21.config import ConfigError
from fl_clip21.privacy import epsilon
from fl_clip21.problems import Problem, build_problem, client_grads

# on_round(algorithm, record, rounds) after every round, for progress displays
# (the same callback the Flower engine takes).
OnRound = Callable[[str, dict[str, Any], int], None]


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


def _batch_size(algorithm: Algorithm, cfg: dict[str, Any]) -> int | None:
    return cfg["batch-size"] if algorithm.stochastic else None


def _grad_fn(problem: Problem, client: int, batch: int | None) -> GradFn:
    def grad_fn(p, rng):
        return problem.client_grad(client, p, rng if batch else None, batch)

    return grad_fn


def client_round(
    algorithm: Algorithm, problem: Problem, cfg: dict[str, Any], client: int, server_round: int,
    params: core.Params, state: dict,
) -> ClientResult:
    """Client ``client``'s work in ``server_round``: the algorithm's client update."""
    grad_fn = _grad_fn(problem, client, _batch_size(algorithm, cfg))
    return algorithm.client_update(params, state, grad_fn, client_rng(cfg["seed"], client, server_round))


def _prefetched(
    grad_fn: GradFn, params: core.Params, grad: core.Params, rng: np.random.Generator,
    fresh: dict | None, drawn: dict | None,
) -> GradFn:
    """``grad_fn`` whose first call, at ``params`` with an unused ``rng``, returns ``grad``.

    ``grad`` came from a batched call that drew the minibatch from ``rng``, taking
    it from state ``fresh`` to ``drawn``, after which ``rng`` was set back to
    ``fresh``. That first call puts ``rng`` in state ``drawn``, as if it had drawn
    the minibatch itself. Any other call computes the gradient as
    :func:`client_round` does, so the draws never depend on the prefetching.
    """
    pending = [True]

    def fn(p, r):
        first = bool(pending)
        pending.clear()
        if first and p is params and r is rng and (fresh is None or r.bit_generator.state == fresh):
            if drawn is not None:
                r.bit_generator.state = drawn
            return grad
        return grad_fn(p, r)

    return fn


def clients_round(
    algorithm: Algorithm, problem: Problem, cfg: dict[str, Any], clients: Sequence[int], server_round: int,
    params: core.Params, states: Sequence[dict],
) -> list[ClientResult]:
    """:func:`client_round` of every client in ``clients``, with one batched gradient call.

    ``states[j]`` is the state of client ``clients[j]``. The results, generator
    draws included, are those of :func:`client_round` client after client.
    """
    batch = _batch_size(algorithm, cfg)
    rngs = [client_rng(cfg["seed"], i, server_round) for i in clients]
    fresh: list[dict | None] = [None] * len(clients)
    drawn: list[dict | None] = [None] * len(clients)
    if batch:
        fresh = [r.bit_generator.state for r in rngs]
        grads = client_grads(problem, params, clients, rngs, batch)
        drawn = [r.bit_generator.state for r in rngs]
        for r, state in zip(rngs, fresh):
            r.bit_generator.state = state
    else:
        grads = client_grads(problem, params, clients)
    return [
        algorithm.client_update(
            params, state, _prefetched(_grad_fn(problem, i, batch), params, grad, rng, f, d), rng
        )
        for i, state, grad, rng, f, d in zip(clients, states, grads, rngs, fresh, drawn)
    ]


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


def run_local(cfg: dict[str, Any], name: str, on_round: OnRound | None = None) -> dict[str, Any]:
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
        clients = sample_clients(cfg["seed"], k, n, cfg["fraction"])
        times_asked[clients] += 1
        results = clients_round(algorithm, problem, cfg, clients, k, params, [states[i] for i in clients])
        for i, res in zip(clients, results):
            states[i] = res.state
        messages = [res.message for res in results]
        clipped = sum(res.clipped for res in results)
        params, server_state = algorithm.server_update(params, server_state, messages, n)
        rec = {
            "round": k, "participants": len(clients), "accepted": len(messages),
            "clip_fraction": clipped / len(messages), "rejected": 0, "failed": 0, "resyncs": 0,
            "bytes_up": sum(message_bytes(algorithm, m) for m in messages),
            "seconds": time.perf_counter() - t0,
            **round_epsilon(algorithm, times_asked, cfg["delta"]),
        }
        rec.update(evaluate(problem, params))
        records.append(rec)
        if on_round is not None:
            on_round(name, rec, cfg["rounds"])
    return {
        "records": records, "params": params, "server_state": server_state, "client_states": states,
        "wall_seconds": time.perf_counter() - start,
    }


def check_vectorized(cfg: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``cfg`` lists an algorithm only the Flower engine runs."""
    for name in cfg["algorithms"]:
        if name in FLOWER_BASELINES:
            raise ConfigError(
                f"algorithms: {name!r} is Flower's own strategy and runs only with --engine flower; "
                f"drop it from algorithms to use --engine vectorized"
            )


def run_vectorized(cfg: dict[str, Any], on_round: OnRound | None = None) -> dict[str, dict[str, Any]]:
    """Every algorithm of ``cfg`` with :func:`run_local`: ``{algorithm: result}``.

    The results have the shape of the Flower engine's (``records``, ``params``,
    ``wall_seconds``) and the same values. Flower's own baselines
    (``flower-dp-fixed``) are refused, before anything runs.
    """
    check_vectorized(cfg)
    out = {}
    for name in cfg["algorithms"]:
        res = run_local(cfg, name, on_round)
        out[name] = {k: res[k] for k in ("records", "params", "wall_seconds")}
    return out
