"""What every engine shares: client sampling, per-client RNGs, one round.

System heterogeneity is drawn here too, from seeded streams of (seed, client,
round): which clients are online (:func:`sample_clients` picks among them) and
which sampled clients are slow (:func:`straggler_delay`). The Flower client
really sleeps that long and the Flower server drops replies later than the
round timeout; ``run_local`` drops the same replies (:func:`late_clients`).

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


# Seeded streams of system heterogeneity, apart from the clients' training generators:
# who is online, who is slow. Client i's draw in a round is entry i of the round's
# stream, whatever the number of clients.
ONLINE_STREAM = 0xA7A1
STRAGGLER_STREAM = 0x51A6
# Seconds the server waits for replies when round-timeout is 0 (Flower's Strategy.start default).
REPLY_WAIT = 3600.0


def _round_uniforms(seed: int, server_round: int, stream: int, size: int) -> np.ndarray:
    """Draws in [0, 1) of clients 0..size-1 in ``server_round`` from ``stream``."""
    # Four words, the last non-zero: never the key of client_rng or of the sampling generator.
    return np.random.default_rng([seed, server_round, stream, 1]).random(size)


def online_clients(seed: int, server_round: int, num_clients: int, availability: float) -> list[int]:
    """The clients online in ``server_round``: each with probability ``availability`` (seeded)."""
    if availability >= 1:
        return list(range(num_clients))
    draws = _round_uniforms(seed, server_round, ONLINE_STREAM, num_clients)
    return [int(i) for i in np.flatnonzero(draws < availability)]


def sample_clients(
    seed: int, server_round: int, num_clients: int, fraction: float, availability: float = 1.0
) -> list[int]:
    """The client indices that take part in ``server_round`` (seeded, sorted).

    round(``fraction`` x ``num_clients``) of them (at least one), drawn among the
    clients online in that round (:func:`online_clients`); all online clients
    when there are fewer, none when nobody is online.
    """
    online = online_clients(seed, server_round, num_clients, availability)
    if fraction >= 1 or not online:
        return online
    m = min(max(1, int(round(fraction * num_clients))), len(online))
    rng = np.random.default_rng([seed, 0x5A3D1E, server_round])
    return sorted(online[int(j)] for j in rng.choice(len(online), size=m, replace=False))


def straggler_delay(cfg: dict[str, Any], client: int, server_round: int) -> float:
    """Seconds late client ``client`` replies in ``server_round``: ``straggler-delay`` if it is slow, else 0."""
    p = cfg.get("straggler-fraction", 0.0)
    if p <= 0:
        return 0.0
    slow = _round_uniforms(cfg["seed"], server_round, STRAGGLER_STREAM, client + 1)[client] < p
    return float(cfg["straggler-delay"]) if slow else 0.0


def reply_timeout(cfg: dict[str, Any]) -> float:
    """Seconds the server waits for a round's replies."""
    return cfg.get("round-timeout", 0.0) or REPLY_WAIT


def _drops_possible(cfg: dict[str, Any]) -> bool:
    """Whether some stragglers' replies miss the round timeout."""
    return cfg.get("straggler-fraction", 0.0) > 0 and cfg["straggler-delay"] > reply_timeout(cfg)


def late_clients(cfg: dict[str, Any], server_round: int, clients: Sequence[int]) -> set[int]:
    """The clients of ``clients`` whose reply in ``server_round`` misses the round timeout."""
    if not _drops_possible(cfg):
        return set()
    draws = _round_uniforms(cfg["seed"], server_round, STRAGGLER_STREAM, cfg["num-clients"])
    return {i for i in clients if draws[i] < cfg["straggler-fraction"]}


def dropped_reply_state(algorithm: Algorithm, server_copy: dict | None, after: dict) -> dict:
    """A client's state after a round whose reply the server did not apply.

    The memory the server mirrors (``algorithm.memory``, Clip21's v_i) is the
    server's copy, the sum of the client's messages it applied: the Flower
    client's consistency protocol resyncs the client to it. With sigma = 0 that
    is the memory the client had before the round. The rest of the state is
    what the client computed.
    """
    if algorithm.memory is None:
        return after
    return {**after, algorithm.memory: server_copy}


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
    """Bytes of values a message carries: dense arrays, or Top-k's k indices and k values.

    The Flower client sends the same bytes (:func:`fl_clip21.flower.records.encode_sparse`).
    """
    if algorithm.sparse:
        d = sum(int(np.size(v)) for v in message.values())
        index_bytes = 4 if d < 2**31 else 8
        return algorithm.sparse_entries(d) * (index_bytes + np.result_type(*message.values()).itemsize)
    return sum(int(v.nbytes) for v in message.values())


NORM_QUANTILES = (("q10", 10.0), ("q50", 50.0), ("q90", 90.0), ("max", 100.0))


def reports_norms(algorithm: Algorithm) -> bool:
    """Whether clients report their norms: never with DP noise (an unclipped norm is not private)."""
    return algorithm.noise_multiplier is None


def norm_quantiles(norms: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Quantiles (10/50/90/max) of the accepted messages' ``(update, operator input)`` norms.

    ``update_norm_*``: the norm of the update the client computed (gradient,
    momentum or model update); ``input_norm_*``: of what the operator clipped
    (Clip21: ||grad - v_i||). Empty when there are no norms.
    """
    if not norms:
        return {}
    table = np.asarray(norms, dtype=np.float64)
    return {
        f"{name}_{suffix}": float(np.percentile(table[:, j], q))
        for j, name in enumerate(("update_norm", "input_norm"))
        for suffix, q in NORM_QUANTILES
    }


def round_epsilon(algorithm: Algorithm, times_asked: np.ndarray, delta: float) -> dict[str, float]:
    """``{"epsilon": ...}`` of the most-asked client, for algorithms with DP noise."""
    if algorithm.noise_multiplier is None:
        return {}
    return {"epsilon": epsilon(algorithm.noise_multiplier, int(times_asked.max()), delta)}


def evaluate(problem: Problem, params: core.Params) -> dict[str, float]:
    """Global metrics at ``params``: loss, grad_norm_sq (on all data), accuracy."""
    norm = core.global_norm(problem.grad(params))
    # A product overflows to inf where ``norm ** 2`` raises: a diverging run is reported, not a crash.
    out = {"loss": problem.loss(params), "grad_norm_sq": norm * norm}
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
    # The server's copies of the clients' memories, kept when a reply can be dropped.
    copies = (
        [core.zeros_like(params) for _ in range(n)]
        if algorithm.memory is not None and _drops_possible(cfg) else None
    )
    records = []
    times_asked = np.zeros(n, dtype=np.int64)
    start = time.perf_counter()
    for k in range(1, cfg["rounds"] + 1):
        t0 = time.perf_counter()
        clients = sample_clients(cfg["seed"], k, n, cfg["fraction"], cfg.get("availability", 1.0))
        times_asked[clients] += 1
        results = clients_round(algorithm, problem, cfg, clients, k, params, [states[i] for i in clients])
        late = late_clients(cfg, k, clients)
        arrived = []
        for i, res in zip(clients, results):
            if i in late:
                states[i] = dropped_reply_state(algorithm, copies[i] if copies else None, res.state)
            else:
                states[i] = res.state
                arrived.append(res)
                if copies is not None:
                    copies[i] = core.add(copies[i], res.message)
        messages = [res.message for res in arrived]
        clipped = sum(res.clipped for res in arrived)
        params, server_state = algorithm.server_update(params, server_state, messages, n)
        rec = {
            "round": k, "participants": len(clients), "accepted": len(messages),
            "clip_fraction": clipped / len(messages) if messages else 0.0, "rejected": 0,
            "failed": len(late), "resyncs": 0,
            "bytes_up": sum(message_bytes(algorithm, m) for m in messages),
            "seconds": time.perf_counter() - t0,
            **round_epsilon(algorithm, times_asked, cfg["delta"]),
            **(norm_quantiles([res.norms for res in arrived]) if reports_norms(algorithm) else {}),
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
