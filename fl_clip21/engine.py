"""What every engine shares: client sampling, random streams, a batch of clients' round.

System heterogeneity is drawn here too, from seeded streams of (seed, client,
round): which clients are online (:func:`sample_clients` picks among them) and
which sampled clients are slow (:func:`straggler_delay`). The Flower client
really sleeps that long and the Flower server drops replies later than the
round timeout; ``run_local`` drops the same replies (:func:`late_rows`).

``run_local`` runs a scenario's algorithm in this process with the same
algorithm values, sampling and random streams as the Flower engine: it is the
reference the Flower runs are checked against. Client state is stacked, one
(n, d) array per name, and each round runs the algorithm's client function on
all sampled rows at once (the Flower client runs the same function on one).
``run_vectorized`` runs every algorithm of a scenario that way: the ``--engine
vectorized`` of the CLI. Its arrays live on the scenario's ``device``
(fl_clip21.backend: numpy, or torch on the CPU or a GPU); sampling, stragglers,
privacy accounting and the records are computed on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fl_clip21 import backend, core, streams
from fl_clip21.algorithms import FLOWER_BASELINES, Algorithm, ClientRound, Grads, Noise, algorithm_from_config
from fl_clip21.config import ConfigError
from fl_clip21.fault_protocol import batch_record, new_copies, reports_norms, settle_rows
from fl_clip21.problems import Evaluation, Minibatch, Problem, build_problem

# on_round(algorithm, record, rounds) after every round, for progress displays
# (the same callback the Flower engine takes).
OnRound = Callable[[str, dict[str, Any], int], None]


# Seeded streams of system heterogeneity, apart from the clients' training generators:
# who is online, who is slow. Client i's draw in a round is entry i of the round's
# stream, whatever the number of clients.
ONLINE_STREAM = 0xA7A1
STRAGGLER_STREAM = 0x51A6
POISSON_STREAM = 0x9015
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
    seed: int, server_round: int, num_clients: int, fraction: float, availability: float = 1.0,
    poisson: bool = False, secure: bool = False,
) -> list[int]:
    """The client indices that take part in ``server_round`` (seeded, sorted).

    round(``fraction`` x ``num_clients``) of them (at least one), drawn among the
    clients online in that round (:func:`online_clients`); all online clients
    when there are fewer, none when nobody is online. ``secure``: Poisson draws
    come from OS entropy (amplification by subsampling needs a secret sample).
    """
    online = online_clients(seed, server_round, num_clients, availability)
    if fraction >= 1 or not online:
        return online
    if poisson:  # each online client independently with probability fraction (central DP's amplification)
        draws = (np.random.default_rng().random(num_clients) if secure
                 else _round_uniforms(seed, server_round, POISSON_STREAM, num_clients))
        return [i for i in online if draws[i] < fraction]
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


def drops_possible(cfg: dict[str, Any]) -> bool:
    """Whether some stragglers' replies miss the round timeout."""
    return cfg.get("straggler-fraction", 0.0) > 0 and cfg["straggler-delay"] > reply_timeout(cfg)


def late_rows(cfg: dict[str, Any], server_round: int, clients: np.ndarray) -> np.ndarray:
    """Which of ``clients`` (client indices) reply in ``server_round`` later than the round timeout: a bool mask.

    Those :func:`straggler_delay` makes slow, when the delay exceeds the timeout.
    """
    clients = np.asarray(clients, dtype=np.int64)
    if not drops_possible(cfg):
        return np.zeros(clients.shape, dtype=bool)
    draws = _round_uniforms(cfg["seed"], server_round, STRAGGLER_STREAM, cfg["num-clients"])
    return draws[clients] < cfg["straggler-fraction"]


def batch_grads(
    problem: Problem, algorithm: Algorithm, cfg: dict[str, Any], clients: np.ndarray, server_round: int,
    cached: np.ndarray | None = None, at: np.ndarray | None = None, everyone: bool = False,
) -> Grads:
    """``grads(points, step)`` of a batch of clients in ``server_round``: minibatches for stochastic algorithms.

    ``cached``: every client's full gradient at the model ``at`` (from the last
    evaluation); a full-batch algorithm's gradients at ``at`` are read from it
    (``everyone``: the batch is all clients in order, and gets ``cached`` itself).
    """
    size = cfg["batch-size"] if algorithm.stochastic else None

    def grads(points: np.ndarray, step: int) -> np.ndarray:
        if cached is not None and size is None and points is at:
            return cached if everyone else cached[backend.of(cached).asarray(clients)]
        minibatch = Minibatch(cfg["seed"], server_round, size, step) if size is not None else None
        return problem.grads(points, clients, minibatch)

    return grads


def batch_noise(
    cfg: dict[str, Any], clients: np.ndarray, server_round: int, d: int, dtype, xp: backend.Backend = backend.NUMPY
) -> Noise:
    """``noise(step)``: the batch's N(0, I_d) draws of ``server_round`` (counter-based, per client), on ``xp``.

    With ``secure-noise`` the draws come from OS entropy, on the client: the
    seed every client and the server know does not give them.
    """
    if cfg.get("secure-noise", False):
        rng = np.random.default_rng()
        return lambda step: xp.cast(xp.asarray(rng.standard_normal((len(clients), d))), dtype)

    def noise(step: int) -> np.ndarray:
        return xp.cast(xp.normals(cfg["seed"], streams.NOISE, clients, server_round, d, step), dtype)

    return noise


def server_noise(
    seed: int, server_round: int, d: int, xp: backend.Backend = backend.NUMPY
) -> Callable[..., np.ndarray]:
    """``noise(step=0)``: the server's N(0, I_d) draws of ``server_round`` under central DP (its own stream), on ``xp``.

    Every engine draws the same; ``step`` numbers independent draws of a round
    (adaptive clipping's count noise is step 1).
    """
    return lambda step=0: xp.normals(seed, streams.SERVER_NOISE, np.zeros(1, dtype=np.int64), server_round, d, step)[0]


def client_round(
    algorithm: Algorithm, problem: Problem, cfg: dict[str, Any], client: int, server_round: int,
    x: np.ndarray, state: dict[str, np.ndarray],
) -> ClientRound:
    """Client ``client``'s work in ``server_round`` (a batch of one: ``state`` rows are (1, d))."""
    clients = np.array([client], dtype=np.int64)
    return algorithm.client_round(
        x, state, batch_grads(problem, algorithm, cfg, clients, server_round),
        batch_noise(cfg, clients, server_round, x.shape[-1], x.dtype),
    )


def _metrics(ev: Evaluation, norm: float) -> dict[str, float]:
    # A product overflows to inf where ``norm ** 2`` raises: a diverging run is reported, not a crash.
    rec = {"loss": ev.loss, "grad_norm_sq": norm * norm}
    if ev.accuracy is not None:
        rec["accuracy"] = ev.accuracy
    return rec


def metrics(ev: Evaluation) -> dict[str, float]:
    """The record's global metrics: loss, grad_norm_sq (of f, on all data), accuracy."""
    return _metrics(ev, float(core.row_norms(ev.grad)))


def metrics_many(evaluations: Sequence[Evaluation]) -> list[dict[str, float]]:
    """:func:`metrics` of each evaluation, the gradients' norms in one call."""
    if not evaluations:
        return []
    xp = backend.of(evaluations[0].grad)
    norms = xp.to_numpy(core.row_norms(xp.stack([ev.grad for ev in evaluations])))
    return [_metrics(ev, norm) for ev, norm in zip(evaluations, norms.tolist())]


def evaluate(problem: Problem, params: core.Params) -> dict[str, float]:
    """Global metrics at the model ``params`` (array dict)."""
    return metrics(problem.evaluate(problem.layout.flatten(params)))


def run_local(cfg: dict[str, Any], name: str, on_round: OnRound | None = None) -> dict[str, Any]:
    """Run algorithm ``name`` of scenario ``cfg`` in-process on stacked client state; the Flower engine's output.

    Every client's state is one (n, d) array per name; a round computes the
    sampled clients' rows in one batched call. A full-batch algorithm reads its
    gradients from the last evaluation, which computed them at the same model.
    The arrays live on the scenario's ``device``; the result holds numpy arrays.
    """
    xp = backend.get(cfg.get("device", "numpy"))
    problem = build_problem(cfg, xp.name)
    algorithm = algorithm_from_config(name, cfg)
    n, layout = cfg["num-clients"], problem.layout
    d, dtype = layout.size, layout.dtype
    x = xp.asarray(layout.flatten(problem.init_params()))
    server = algorithm.server_init(d, dtype, xp)
    state = algorithm.client_init(n, d, dtype, xp)
    # The server's copies of the clients' memories, kept when a reply can be dropped.
    copies = new_copies(algorithm, n, d, dtype, xp, drops_possible(cfg))
    reuse = not algorithm.stochastic
    cached = None
    records = []
    times_asked = np.zeros(n, dtype=np.int64)
    # Every client every round: the batch is the arrays themselves (no sampling drawn, no rows copied).
    all_clients = np.arange(n) if cfg["fraction"] >= 1 and cfg.get("availability", 1.0) >= 1 else None
    # Every reply arrives unless stragglers can miss the timeout: no mask drawn per round.
    all_arrive = None if drops_possible(cfg) else np.ones(n, dtype=bool)
    start = time.perf_counter()
    for k in range(1, cfg["rounds"] + 1):
        t0 = time.perf_counter()
        clients = all_clients if all_clients is not None else np.asarray(
            sample_clients(cfg["seed"], k, n, cfg["fraction"], cfg.get("availability", 1.0),
                           cfg.get("sampling") == "poisson", cfg.get("secure-noise", False)), dtype=np.int64
        )
        times_asked[clients] += 1
        everyone = len(clients) == n  # then the rows are the arrays themselves, not copies
        index = None if everyone else xp.asarray(clients)
        rows = {s: v if everyone else v[index] for s, v in state.items()}
        out = algorithm.client_round(
            x, rows, batch_grads(problem, algorithm, cfg, clients, k, cached, x, everyone),
            batch_noise(cfg, clients, k, d, dtype, xp),
        )
        cached = None  # the round may have written into it
        arrived = all_arrive[: len(clients)] if all_arrive is not None else ~late_rows(cfg, k, clients)
        for s, v in out.state.items():
            if everyone and v is not state[s]:
                state[s][...] = v
            elif not everyone:
                state[s][index] = v
        memory = state[algorithm.memory] if algorithm.memory is not None else None
        messages = settle_rows(memory, copies, clients, out.messages, arrived)
        x, server = algorithm.server_round(x, server, messages, n, noise=server_noise(cfg["seed"], k, d, xp))
        rec = batch_record(
            k, algorithm, applied=arrived, active=xp.to_numpy(out.active),
            norms=xp.to_numpy(out.norms) if reports_norms(algorithm) else None, d=d,
            dtype=dtype, seconds=time.perf_counter() - t0, times_asked=times_asked, delta=cfg["delta"],
        )
        ev = problem.evaluate(x, client_grads=reuse)
        cached = ev.client_grads
        rec.update(metrics(ev))
        records.append(rec)
        if on_round is not None:
            on_round(name, rec, cfg["rounds"])
    return {
        "records": records, "params": layout.unflatten(xp.to_numpy(x)),
        "server_state": {s: layout.unflatten(xp.to_numpy(v)) for s, v in server.items()},
        "client_states": {s: xp.to_numpy(v) for s, v in state.items()}, "wall_seconds": time.perf_counter() - start,
    }


def check_vectorized(cfg: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``cfg`` lists an algorithm only the Flower engine runs."""
    for name in cfg["algorithms"]:
        if name in FLOWER_BASELINES:
            raise ConfigError(
                f"algorithms: {name!r} is Flower's own strategy and runs only with --engine flower; "
                f"drop it from algorithms to use --engine vectorized"
            )


def check_flower(cfg: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``cfg`` asks the Flower engine for a device: only the batched engine has one."""
    if cfg.get("device", "numpy") != "numpy":
        raise ConfigError(
            f"device={cfg['device']!r} is for the batched engine (--engine vectorized); the Flower engine "
            f"computes on numpy: drop device or use --engine vectorized"
        )


def run_vectorized(cfg: dict[str, Any], on_round: OnRound | None = None) -> dict[str, dict[str, Any]]:
    """Every algorithm of ``cfg`` with :func:`run_local`: ``{algorithm: result}``.

    The results have the shape of the Flower engine's (``records``, ``params``,
    ``wall_seconds``) and the same values. Flower's own baselines
    (``flower-dp-*``) are refused, before anything runs.
    """
    check_vectorized(cfg)
    out = {}
    for name in cfg["algorithms"]:
        res = run_local(cfg, name, on_round)
        out[name] = {k: res[k] for k in ("records", "params", "wall_seconds")}
    return out
