"""Every algorithm of docs/algorithms.md, written once on batches of clients, as a value every engine takes.

An :class:`Algorithm` is a client function and a server function (fedjax's
``init``/``apply`` split) over flat vectors: a batch of m clients is an (m, d)
array per client state (fl_clip21.layout), the server holds x and g as (d,)
vectors. The batched engine calls the client function with thousands of rows,
the Flower client with one, the Flower strategy the server function with the
round's accepted messages stacked: no engine has its own copy of an update rule.
The arrays are numpy's, or torch's on a device (fl_clip21.backend): the
functions compute on the backend of the arrays they are given.

Hyper-parameters come in ``hp`` (default: the algorithm's own ``hyper``); a
batched sweep passes an (m,) array per key instead, one value per row.
Symbols follow the paper: ``tau`` the clipping threshold, ``v`` the client
memory v_i, ``g`` the server aggregate, ``lr`` the server step gamma.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from fl_clip21 import backend, core

# grads(points, step) -> (m, d): the batch's (minibatch) gradients at points, (d,) or (m, d);
# step numbers the draws within a round (CELGC's local steps).
Grads = Callable[[np.ndarray, int], np.ndarray]
# noise(step) -> (m, d) standard normal draws of the batch's clients (counter-based streams).
Noise = Callable[[int], np.ndarray]
Hyper = Mapping[str, "float | np.ndarray"]


@dataclass(frozen=True)
class ClientRound:
    """What a batch of m clients' round produces."""

    messages: np.ndarray  # (m, d): what is sent to the server, and nothing else
    state: dict[str, np.ndarray]  # the clients' new private state, (m, d) per name
    active: np.ndarray  # (m,) bool: whether the contractive operator was active
    # (m, 2): ||update|| (gradient, momentum or model update) and ||operator input||
    # (Clip21: ||grad - v_i||): what a threshold tau is chosen from.
    norms: np.ndarray


@dataclass(frozen=True)
class CentralDP:
    """The server's noise under central DP: std on the sum of messages, and the fixed denominator m.

    ``secure``: the noise comes from the operating system's entropy, not from the
    engine's seeded stream (``secure-noise``: nobody who knows the seed can
    subtract it; the run is not reproducible).
    """

    std: float
    denominator: float
    secure: bool = False


@dataclass(frozen=True)
class Algorithm:
    """An algorithm as data.

    Attributes
    ----------
    name:
        Registry name (``clip21-gd``...).
    client_state:
        Names of the per-client state arrays (``v``, ``g``), each (n, d), zero at the start.
    client_fn:
        ``(x, state, grads, noise, hp) -> ClientRound`` for a batch of clients;
        ``x`` is the model, (d,), or one model per row, (m, d). It may write into
        ``state``'s arrays and into the arrays ``grads`` returns (its callers
        hand it arrays they own, as a batch of many clients cannot afford copies).
    server_state:
        Names of the server's (d,) state vectors (``g``), zero at the start.
    server_fn:
        ``(x, state, total, count, n, hp) -> (x, state)``: ``total`` is the sum of
        the round's accepted messages, ``count`` how many (with central DP the
        noisy sum and the fixed denominator), ``n`` the number of all clients.
    message_bound:
        ``d -> bound``: the largest global norm a valid message of a model with
        ``d`` entries may have. The server rejects a message above
        ``bound * (1 + 1e-6)``. Every registered algorithm has one: its clipping
        bound, or ``message-norm-cap`` for those that do not clip.
    stochastic:
        Whether clients use minibatch gradients.
    memory:
        Name of the client state whose mean over all clients the server's
        ``g`` tracks (``v`` for Clip21, ``g`` for Clip21-SGD2M), or None.
    sparse:
        Messages are mostly zeros (Top-k): engines send indices and values.
    sparse_entries:
        ``d -> k``: the number of (index, value) entries every message of a
        sparse algorithm carries for a model of d entries (exactly k, zeros
        included, so the server can check the count).
    noise_multiplier:
        z of the Gaussian mechanism (local: sigma / (2 tau); central: the
        noise's std over the sum's sensitivity), or None when nothing is noised.
    central:
        Central (user-level) DP: the server adds N(0, std^2 I) to the sum of
        the clipped messages and divides by the fixed ``denominator`` m (the
        expected number of sampled clients) where the algorithm takes a mean.
    aggregate:
        ``(messages, state, hp, noise, central) -> (total, count, state)``: the
        server's own treatment of the round's messages before ``server_fn``
        (DP-FedAvg with adaptive clipping clips them and updates its clipping
        norm), in place of the sum and ``central``'s noise; None for the sum.
    """

    name: str
    client_state: tuple[str, ...]
    client_fn: Callable[..., ClientRound]
    server_state: tuple[str, ...]
    server_fn: Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]]
    message_bound: Callable[[int], float] | None = None
    stochastic: bool = False
    memory: str | None = None
    sparse: bool = False
    sparse_entries: Callable[[int], int] | None = None
    noise_multiplier: float | None = None
    hyper: Mapping[str, float] = field(default_factory=dict)
    central: CentralDP | None = None
    aggregate: Callable[..., tuple[np.ndarray, float, dict[str, np.ndarray]]] | None = None

    def client_init(
        self, m: int, d: int, dtype=np.float64, xp: backend.Backend = backend.NUMPY
    ) -> dict[str, np.ndarray]:
        """Zero state of m clients for a model of d entries (on the backend ``xp``)."""
        return {name: xp.zeros((m, d), dtype=dtype) for name in self.client_state}

    def server_init(self, d: int, dtype=np.float64, xp: backend.Backend = backend.NUMPY) -> dict[str, np.ndarray]:
        return {name: xp.zeros(d, dtype=dtype) for name in self.server_state}

    def client_round(
        self, x: np.ndarray, state: Mapping[str, np.ndarray], grads: Grads, noise: Noise | None = None,
        hp: Hyper | None = None,
    ) -> ClientRound:
        """The round of a batch of clients (state rows (m, d)), with this algorithm's hyper-parameters or ``hp``."""
        return self.client_fn(x, state, grads, noise, self.hyper if hp is None else hp)

    def server_round(
        self, x: np.ndarray, state: Mapping[str, np.ndarray], messages: np.ndarray, n: int, hp: Hyper | None = None,
        noise: Callable[[], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The server's step with the round's accepted messages (m, d), m >= 0.

        With central DP, ``noise(step=0)`` gives the round's N(0, I_d) draws
        (seeded by the engine; step 1 is a second, independent draw) and the sum
        of the messages is noised here, the one place every engine adds it.
        With ``secure`` central DP the draws come from the operating system's
        entropy instead, and ``noise`` is not used.
        """
        hp = self.hyper if hp is None else hp
        xp = backend.of(x)
        if self.central is not None:
            if self.central.secure:
                rng, d = np.random.default_rng(), x.shape[-1]
                noise = lambda step=0: xp.asarray(rng.standard_normal(d))  # noqa: E731 - fresh entropy, never the seed's
            elif noise is None:
                raise ValueError(f"{self.name} with central DP needs the round's server noise")
        if self.aggregate is not None:
            total, count, state = self.aggregate(messages, state, hp, noise, self.central)
            return self.server_fn(x, state, total, count, n, hp)
        total = xp.sum_rows(messages) if len(messages) else xp.zeros(x.shape[-1])
        count: float = len(messages)
        if self.central is not None:
            total = total + self.central.std * noise()
            count = self.central.denominator
        return self.server_fn(x, state, total, count, n, hp)


def model_size(params: Mapping[str, np.ndarray]) -> int:
    """d: the number of entries of the whole model."""
    return int(sum(np.size(v) for v in params.values()))


def gaussian_noise_bound(sigma: float, d: int) -> float:
    """A norm the noise N(0, sigma^2 I_d) exceeds with probability < exp(-50).

    Gaussian concentration: P(||w|| >= sigma (sqrt(d) + t)) <= exp(-t^2 / 2), t = 10.
    """
    return sigma * (np.sqrt(d) + 10.0)


def _col(value: float | np.ndarray, like: np.ndarray) -> float | np.ndarray:
    """A hyper-parameter ready to scale the rows of ``like``: a number, or an (m,) array as an (m, 1) column."""
    a = np.asarray(value)
    return backend.of(like).asarray(a[:, None]) if a.ndim else float(a)


def _noisy(messages: np.ndarray, sigma: float | np.ndarray, noise: Noise | None, step: int = 0) -> np.ndarray:
    """``messages + sigma * N(0, I)`` per row (nothing drawn where sigma is 0 everywhere)."""
    if not np.any(np.asarray(sigma) > 0):
        return messages
    return backend.of(messages).cast(messages + _col(sigma, messages) * noise(step), messages.dtype)


# --- the update rules, on batches (docs/algorithms.md) --------------------------


def _gradient_client(x, state, grads, noise, hp, *, clip: bool):
    """GD, Clip-GD (clip=True): send the gradient, or clip_tau of it plus N(0, sigma^2) noise."""
    g = grads(x, 0)
    xp = backend.of(g)
    if not clip:
        norms = core.row_norms(g)
        return ClientRound(g, {}, xp.zeros(len(g), dtype=bool), xp.stack([norms, norms], axis=1))
    c, active, norms = core.clip_rows(hp["tau"])(g)
    return ClientRound(_noisy(c, hp.get("sigma", 0.0), noise), {}, active, xp.stack([norms, norms], axis=1))


def _averaging_server(x, state, total, count, n, hp, *, clip: bool):
    """x <- x - lr * total / count: the mean of the messages (server-side clipping: clip_tau of the mean)."""
    if not count:
        return x, state
    direction = total / count
    if clip:
        direction = core.clip_rows(hp["tau"])(direction[None, :])[0][0]
    return backend.of(x).cast(x - hp["lr"] * direction, x.dtype), state


def _ef_client(x, state, grads, noise, hp, *, operator, memory="v"):
    """Error feedback: c_i = C(target - v_i), v_i <- v_i + beta2 c_i; sends beta2 (c_i + noise).

    The target is the gradient (Clip21, EF21) or the momentum
    m_i <- (1 - beta1) m_i + beta1 grad (Clip21-SGD2M, state ``v``, memory ``g``).
    """
    target = grads(x, 0)
    xp = backend.of(target)
    beta1, beta2 = hp.get("beta1", 1.0), hp.get("beta2", 1.0)
    new_state = {}
    momentum = memory != "v" and "v" in state  # SGD2M's momentum (kept only when beta1 < 1)
    if momentum:
        v = state["v"]
        target = xp.cast((1 - _col(beta1, v)) * v + _col(beta1, v) * target, v.dtype)
        new_state["v"] = target
    step = core.ef_step_rows(
        target, state[memory], operator(hp, target.shape[1]), beta2, overwrite_target=not momentum,
        overwrite_memory=True,
    )
    new_state[memory] = step.memory
    messages = _noisy(step.increment, hp.get("sigma", 0.0), noise)
    if np.any(np.asarray(beta2) != 1):
        messages = xp.cast(_col(beta2, messages) * messages, step.increment.dtype)
    return ClientRound(messages, new_state, step.active, xp.stack([step.target_norms, step.input_norms], axis=1))


def _ef_server(x, state, total, count, n, hp):
    """g <- g + total / n (the sum of the messages, divided by all n clients), x <- x - lr g."""
    xp = backend.of(x)
    g = xp.cast(state["g"] + total / n, state["g"].dtype)
    return xp.cast(x - hp["lr"] * g, x.dtype), {"g": g}


def _celgc_client(x, state, grads, noise, hp):
    """I local steps y <- y - lr clip_tau(grad(y)) from x; sends x - y."""
    g = grads(x, 0)  # the first step is at x itself: (m, d), which also says how many clients
    xp = backend.of(g)
    y = xp.broadcast_copy(x, g.shape)
    active = xp.zeros(len(g), dtype=bool)
    clip, first = core.clip_rows(hp["tau"]), None
    for s in range(int(hp["local-steps"])):
        c, a, norms = clip(g if s == 0 else grads(y, s))
        first = norms if first is None else first
        y -= xp.cast(_col(hp["lr"], y) * c, y.dtype)
        active |= a
    update = xp.cast(x - y, y.dtype)
    return ClientRound(update, {}, active, xp.stack([core.row_norms(update), first], axis=1))


def _local_update(x, grads, hp) -> np.ndarray:
    """``local-steps`` SGD steps y <- y - lr grad(y) from x; returns the update x - y, (m, d)."""
    xp = backend.of(x)
    g = grads(x, 0)  # the first step is at x itself: (m, d), which also says how many clients
    y = xp.broadcast_copy(x, tuple(g.shape))
    for s in range(int(hp["local-steps"])):
        y -= xp.cast(_col(hp["lr"], y) * (g if s == 0 else grads(y, s)), y.dtype)
    return xp.cast(x - y, y.dtype)


def _dp_fedavg_client(x, state, grads, noise, hp, *, clip: bool):
    """DP-FedAvg's client: local SGD, then the update x - y clipped to C = lr tau (clip), or sent as it is."""
    update = _local_update(x, grads, hp)
    xp = backend.of(update)
    norms = core.row_norms(update)
    if not clip:  # adaptive clipping: the server clips, at a norm only it knows
        nothing_clipped = xp.zeros(len(update), dtype=bool)
        return ClientRound(update, {}, nothing_clipped, xp.stack([norms, norms], axis=1))
    c, active, _ = core.clip_rows(np.asarray(hp["lr"]) * np.asarray(hp["tau"]))(update, True)
    return ClientRound(c, {}, active, xp.stack([norms, norms], axis=1))


def _adaptive_clip_aggregate(messages, state, hp, noise, central):
    """Server-side adaptive clipping (Andrew et al. 2021), with central DP when ``central`` is set.

    The round's clipping norm C (``state["clip"]``, every entry; 0 before the
    first round: C = lr tau) clips each message; b = the fraction of messages
    left unclipped, under central DP its noisy estimate
    ``1/2 + (sum_i (b_i - 1/2) + N(0, count-stddev^2)) / m`` (the centred count,
    one client moves it by 1/2); then ``C <- C exp(-clip-lr (b - target-quantile))``.
    The sum gets N(0, (z_update C)^2 I) with the round's C, the norm it was clipped to.
    """
    xp, d = backend.of(messages), messages.shape[-1]
    clip = float(state["clip"][0]) or float(hp["lr"] * hp["tau"])
    clipped, active, _ = core.clip_rows(clip)(messages)
    total = xp.sum_rows(clipped) if len(messages) else xp.zeros(d)
    unclipped = float(len(messages) - int(active.sum()))
    if central is None:
        count: float = len(messages)
        if not count:
            return total, count, state
        fraction = unclipped / count
    else:
        total = total + hp["update-multiplier"] * clip * noise(0)
        count = central.denominator
        fraction = 0.5 + (unclipped - len(messages) / 2 + hp["count-stddev"] * float(noise(1)[0])) / count
    new_clip = clip * math.exp(-hp["clip-lr"] * (fraction - hp["target-quantile"]))
    return total, count, {**state, "clip": state["clip"] * 0 + new_clip}


def _clip_op(hp: Hyper, d: int) -> core.RowOperator:
    return core.clip_rows(hp["tau"])


def _check(name: str, value: object, rule, text: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or not rule(value):
        raise ValueError(f"{name} {text}, got {value!r}")
    return float(value)


def _positive(name: str, value: object) -> float:
    return _check(name, value, lambda v: v > 0, "must be > 0")


def _beta(name: str, value: object) -> float:
    return _check(name, value, lambda v: 0 < v <= 1, "must be in (0, 1]")


def _sigma(value: object) -> float:
    return _check("sigma", value, lambda v: v >= 0, "must be >= 0")


def topk_count(topk: float, d: int) -> int:
    """k from the ``topk`` key: a count (>= 1) or a fraction of d (in (0, 1))."""
    _positive("topk", topk)
    if topk < 1:
        return max(1, int(round(topk * d)))
    if topk != int(topk):
        raise ValueError(f"topk must be a whole count >= 1 or a fraction in (0, 1), got {topk!r}")
    return int(topk)


def _noise_z(sigma: float, tau: float) -> float | None:
    return sigma / (2 * tau) if sigma > 0 else None


# The bound of a message of an algorithm that does not clip: without one, a single
# client's 1e308 would overflow the server's aggregate.
MESSAGE_NORM_CAP = 1e6


def _cap(value: object) -> Callable[[int], float]:
    cap = _positive("message-norm-cap", value)
    return lambda d: cap


# --- the registry ----------------------------------------------------------


def gd(*, lr: float, stochastic: bool = False, message_norm_cap: float = MESSAGE_NORM_CAP) -> Algorithm:
    """Distributed (S)GD: clients send gradients, the server averages them.

    The server rejects a message whose norm is above ``message_norm_cap``.
    """
    lr, bound = _positive("lr", lr), _cap(message_norm_cap)
    return Algorithm(
        "sgd" if stochastic else "gd", (), functools.partial(_gradient_client, clip=False), (),
        functools.partial(_averaging_server, clip=False), message_bound=bound, stochastic=stochastic,
        hyper={"lr": lr, "message-norm-cap": bound(0)},
    )


def clip_gd(*, lr: float, tau: float, sigma: float = 0.0, stochastic: bool = False) -> Algorithm:
    """Naive client-side clipping: clients send ``clip_tau(grad) + N(0, sigma^2)``."""
    lr, tau, sigma = _positive("lr", lr), _positive("tau", tau), _sigma(sigma)
    return Algorithm(
        "clip-sgd" if stochastic else "clip-gd", (), functools.partial(_gradient_client, clip=True), (),
        functools.partial(_averaging_server, clip=False),
        message_bound=lambda d: tau + gaussian_noise_bound(sigma, d), stochastic=stochastic,
        noise_multiplier=_noise_z(sigma, tau), hyper={"lr": lr, "tau": tau, "sigma": sigma},
    )


def server_clip_gd(*, lr: float, tau: float, message_norm_cap: float = MESSAGE_NORM_CAP) -> Algorithm:
    """Server-side clipping of the averaged gradient; clients' messages are bounded by ``message_norm_cap``."""
    lr, tau, bound = _positive("lr", lr), _positive("tau", tau), _cap(message_norm_cap)
    return Algorithm(
        "server-clip-gd", (), functools.partial(_gradient_client, clip=False), (),
        functools.partial(_averaging_server, clip=True), message_bound=bound,
        hyper={"lr": lr, "tau": tau, "message-norm-cap": bound(0)},
    )


def clip21(*, lr: float, tau: float, stochastic: bool = False) -> Algorithm:
    """Clip21-GD / Clip21-SGD: error feedback with ``C = clip_tau``."""
    lr, tau = _positive("lr", lr), _positive("tau", tau)
    return Algorithm(
        "clip21-sgd" if stochastic else "clip21-gd", ("v",), functools.partial(_ef_client, operator=_clip_op),
        ("g",), _ef_server, message_bound=lambda d: tau, stochastic=stochastic, memory="v",
        hyper={"lr": lr, "tau": tau},
    )


def clip21_sgd2m(
    *, lr: float, tau: float, beta1: float = 1.0, beta2: float = 1.0, sigma: float = 0.0
) -> Algorithm:
    """Clip21-SGD2M: client momentum beta1, error-feedback step beta2, local noise sigma."""
    lr, tau = _positive("lr", lr), _positive("tau", tau)
    beta1, beta2, sigma = _beta("beta1", beta1), _beta("beta2", beta2), _sigma(sigma)
    return Algorithm(
        "clip21-sgd2m", ("g", "v") if beta1 < 1 else ("g",),
        functools.partial(_ef_client, operator=_clip_op, memory="g"), ("g",), _ef_server,
        message_bound=lambda d: beta2 * (tau + gaussian_noise_bound(sigma, d)), stochastic=True,
        memory="g", noise_multiplier=_noise_z(sigma, tau),
        hyper={"lr": lr, "tau": tau, "beta1": beta1, "beta2": beta2, "sigma": sigma},
    )


def ef21_topk(
    *, lr: float, topk: float, tau: float | None = None, message_norm_cap: float = MESSAGE_NORM_CAP
) -> Algorithm:
    """EF21 with Top-k; with ``tau``, Clip21-TopK (Top-k, then clipping).

    Messages are bounded by ``tau`` (Clip21-TopK) or else by ``message_norm_cap``.
    """
    lr = _positive("lr", lr)
    topk_count(topk, 1)  # checks the value
    clip = tau is not None
    bound = (lambda d: _positive("tau", tau)) if clip else _cap(message_norm_cap)
    bound(0)

    def operator(hp: Hyper, d: int) -> core.RowOperator:
        op = core.topk_rows(topk_count(topk, d))
        return core.compose_rows(op, core.clip_rows(hp["tau"])) if clip else op

    return Algorithm(
        "clip21-topk" if clip else "ef21-topk", ("v",), functools.partial(_ef_client, operator=operator),
        ("g",), _ef_server, message_bound=bound, memory="v", sparse=True,
        sparse_entries=lambda d: min(topk_count(topk, d), d),
        hyper={"lr": lr, "topk": topk, **({"tau": tau} if clip else {"message-norm-cap": bound(0)})},
    )


def celgc(*, lr: float, tau: float, local_steps: int = 1) -> Algorithm:
    """CELGC: I local steps ``y <- y - min(eta, gamma_c / ||g||) g`` from x, then model averaging.

    With eta = lr and gamma_c = lr * tau each local step is ``y - lr * clip_tau(g)``.
    Clients send ``x - y`` (the server's new model is the mean of the y_i: server step 1).
    """
    lr, tau = _positive("lr", lr), _positive("tau", tau)
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"local-steps must be an integer >= 1, got {local_steps!r}")

    def server(x, state, total, count, n, hp):
        return _averaging_server(x, state, total, count, n, {**hp, "lr": 1.0}, clip=False)

    return Algorithm(
        "celgc", (), _celgc_client, (), server,
        message_bound=lambda d: local_steps * lr * tau, stochastic=True,
        hyper={"lr": lr, "tau": tau, "local-steps": local_steps},
    )


def _local_steps(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"local-steps must be an integer >= 1, got {value!r}")
    return value


def dp_fedavg(*, lr: float, tau: float, local_steps: int = 1) -> Algorithm:
    """DP-FedAvg with fixed clipping (McMahan et al. 2018; Flower's DP FedAvg), batched.

    Each sampled client takes ``local_steps`` SGD steps of size ``lr`` from x and
    sends its update ``x - y`` clipped to C = lr tau; the server's new model is
    x minus the mean of the messages (server step 1), with central noise
    N(0, (z C)^2 I) on their sum and the fixed denominator m under DP
    (:func:`with_central_dp`). With one local step the message is
    ``lr clip_tau(grad)``: the same iterates as ``clip-sgd`` under central DP with
    the same lr, tau and sigma (docs/algorithms.md, "DP-FedAvg").
    """
    lr, tau, local_steps = _positive("lr", lr), _positive("tau", tau), _local_steps(local_steps)

    def server(x, state, total, count, n, hp):
        return _averaging_server(x, state, total, count, n, {**hp, "lr": 1.0}, clip=False)

    return Algorithm(
        "dp-fedavg", (), functools.partial(_dp_fedavg_client, clip=True), (), server,
        message_bound=lambda d: lr * tau, stochastic=True,
        hyper={"lr": lr, "tau": tau, "local-steps": local_steps},
    )


def dp_fedavg_adaptive(
    *, lr: float, tau: float, local_steps: int = 1, target_quantile: float = 0.5, clip_lr: float = 0.2,
    count_stddev: float = 0.0, message_norm_cap: float = MESSAGE_NORM_CAP,
) -> Algorithm:
    """DP-FedAvg with adaptive clipping (Andrew et al. 2021; Flower's server-side adaptive clipping), batched.

    Clients send their local-SGD update unclipped (bounded by
    ``message_norm_cap``); the server clips each to its clipping norm C (first
    C = lr tau) and moves C geometrically toward the ``target_quantile`` of the
    update norms: ``C <- C exp(-clip_lr (b - target_quantile))``, b the (noisy,
    under DP) fraction of unclipped updates (:func:`_adaptive_clip_aggregate`).
    ``count_stddev``: the std of the count's noise under DP (0: m / 20, Andrew
    et al.'s and Flower's default).
    """
    lr, tau, local_steps = _positive("lr", lr), _positive("tau", tau), _local_steps(local_steps)
    target_quantile = _check("target-quantile", target_quantile, lambda v: 0 <= v <= 1, "must be in [0, 1]")
    clip_lr = _positive("clip-lr", clip_lr)
    count_stddev = _check("count-stddev", count_stddev, lambda v: v >= 0, "must be >= 0")
    bound = _cap(message_norm_cap)

    def server(x, state, total, count, n, hp):
        return _averaging_server(x, state, total, count, n, {**hp, "lr": 1.0}, clip=False)

    return Algorithm(
        "dp-fedavg-adaptive", (), functools.partial(_dp_fedavg_client, clip=False), ("clip",), server,
        message_bound=bound, stochastic=True, aggregate=_adaptive_clip_aggregate,
        hyper={"lr": lr, "tau": tau, "local-steps": local_steps, "target-quantile": target_quantile,
               "clip-lr": clip_lr, "count-stddev": count_stddev, "message-norm-cap": bound(0)},
    )


# name -> (factory, the scenario keys it takes; a key's keyword is its name with "_" for "-").
_REGISTRY: dict[str, tuple[Callable[..., Algorithm], tuple[str, ...]]] = {
    "gd": (gd, ("lr", "message-norm-cap")),
    "sgd": (functools.partial(gd, stochastic=True), ("lr", "message-norm-cap")),
    "clip-gd": (clip_gd, ("lr", "tau", "sigma")),
    "clip-sgd": (functools.partial(clip_gd, stochastic=True), ("lr", "tau", "sigma")),
    "server-clip-gd": (server_clip_gd, ("lr", "tau", "message-norm-cap")),
    "clip21-gd": (clip21, ("lr", "tau")),
    "clip21-sgd": (functools.partial(clip21, stochastic=True), ("lr", "tau")),
    "clip21-sgd2m": (clip21_sgd2m, ("lr", "tau", "beta1", "beta2", "sigma")),
    "ef21-topk": (functools.partial(ef21_topk, tau=None), ("lr", "topk", "message-norm-cap")),
    "clip21-topk": (ef21_topk, ("lr", "topk", "tau")),
    "celgc": (celgc, ("lr", "tau", "local-steps")),
    "dp-fedavg": (dp_fedavg, ("lr", "tau", "local-steps")),
    "dp-fedavg-adaptive": (
        dp_fedavg_adaptive,
        ("lr", "tau", "local-steps", "target-quantile", "clip-lr", "count-stddev", "message-norm-cap"),
    ),
}
ALGORITHMS: dict[str, Callable[..., Algorithm]] = {name: factory for name, (factory, _) in _REGISTRY.items()}
# The scenario keys each algorithm takes: algorithm_from_config passes it these and no others.
HYPER_KEYS: dict[str, tuple[str, ...]] = {name: keys for name, (_, keys) in _REGISTRY.items()}
# Run by Flower's own DP strategies (fl_clip21.flower.dp_baseline), not an Algorithm value.
# flower-dp-fixed is the older name of flower-dp-client-fixed.
FLOWER_BASELINES = ("flower-dp-client-fixed", "flower-dp-server-fixed", "flower-dp-adaptive", "flower-dp-fixed")
# DP-FedAvg (batched and Flower's): central DP in either mode (dp = "local" gives it the
# multiplier the local algorithms get, sigma / (2 tau)); the clipping norm is C = lr tau.
DP_FEDAVG = ("dp-fedavg", "dp-fedavg-adaptive", *FLOWER_BASELINES)


def _keyword(key: str) -> str:
    return key.replace("-", "_")


def make_algorithm(name: str, **hyper: object) -> Algorithm:
    """Build the algorithm registered as ``name`` from hyper-parameters.

    Parameters
    ----------
    name:
        A name of :data:`ALGORITHMS`.
    **hyper:
        The keywords of the scenario keys :data:`HYPER_KEYS` lists for ``name``
        (``local_steps`` for ``local-steps``); any other one is an error.

    Raises
    ------
    ValueError
        For an unknown algorithm, a hyper-parameter ``name`` does not take, or a bad value.
    """
    try:
        factory = ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"algorithms: unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}"
        ) from None
    takes = [_keyword(k) for k in HYPER_KEYS[name]]
    unknown = sorted(set(hyper) - set(takes))
    if unknown:
        raise ValueError(
            f"{name} takes no hyper-parameter {unknown[0]!r} (got {hyper[unknown[0]]!r}); "
            f"it takes {', '.join(takes)}"
        )
    return factory(**hyper)


# The algorithms whose messages are clipped (bounded by tau, beta2 tau, or lr tau for DP-FedAvg),
# so the server can noise their sum under central DP; DP-FedAvg with adaptive clipping clips them itself.
CENTRAL_DP = (
    "clip-gd", "clip-sgd", "clip21-gd", "clip21-sgd", "clip21-sgd2m", "clip21-topk", "dp-fedavg", "dp-fedavg-adaptive",
)


def adaptive_noise(z: float, count_stddev: float) -> float:
    """The multiplier of the update's noise when the clipped count takes its share of z (Andrew et al., Thm. 1).

    The round releases the noisy sum (sensitivity C, noise z_u C) and the noisy
    centred count (sensitivity 1/2, noise ``count_stddev``): together a Gaussian
    mechanism of multiplier z when z_u^-2 + (2 count_stddev)^-2 = z^-2. Flower's
    ``compute_adaptive_noise_params`` computes the same z_u.
    """
    if not z < 2 * count_stddev:
        raise ValueError(
            f"count-stddev must be > z / 2 = {z / 2:g} for the noise multiplier z={z:g} (the clipped count takes a "
            f"share of the privacy budget), got {count_stddev:g}: raise count-stddev (default: the clients a round / 20) "
            f"or lower the noise"
        )
    return (z ** -2 - (2 * count_stddev) ** -2) ** -0.5


def with_central_dp(
    algorithm: Algorithm, sigma: float, denominator: float, rate: float = 1.0, *, replace_one: bool = False,
    secure: bool = False,
) -> Algorithm:
    """``algorithm`` (built without client noise) under central DP of noise ``sigma`` on the sum of its messages.

    One client moves the sum by at most its message bound s (tau; beta2 tau for
    Clip21-SGD2M, lr tau for DP-FedAvg, whose noise is scaled the same way), so
    under add/remove-one adjacency the noise multiplier is z = sigma / tau;
    ``denominator`` is m, the expected number of clients a round, and ``rate``
    the Poisson sampling rate (1: no amplification). ``replace_one``: a fixed
    number m < n of clients a round, whose adjacency is replace-one (s doubles:
    the accountant's multiplier is z / 2, without amplification;
    :mod:`fl_clip21.privacy`). ``secure``: the noise comes from OS entropy.
    """
    if algorithm.name not in CENTRAL_DP:
        raise ValueError(f"{algorithm.name} has no central DP (its messages are not clipped); it works with "
                         f"{', '.join(CENTRAL_DP)}")
    sigma = _sigma(sigma)
    if sigma == 0:
        return algorithm
    from fl_clip21.privacy import accounted_multiplier

    hyper = dict(algorithm.hyper)
    tau, z = hyper["tau"], sigma / hyper["tau"]
    scale = hyper["lr"] if algorithm.name.startswith("dp-fedavg") else hyper.get("beta2", 1.0)
    std = scale * sigma
    if algorithm.aggregate is not None:  # adaptive clipping: the update's noise follows the clipping norm
        count_stddev = hyper["count-stddev"] or denominator / 20
        hyper.update({"count-stddev": count_stddev, "update-multiplier": adaptive_noise(z, count_stddev)})
        std = hyper["update-multiplier"] * scale * tau
    return replace(
        algorithm, central=CentralDP(std, float(denominator), secure),
        noise_multiplier=accounted_multiplier(z, replace_one),
        hyper={**hyper, "dp": "central", "server-sigma": sigma, "sampling-rate": 1.0 if replace_one else float(rate),
               "replace-one": float(replace_one)},
    )


def central_sampling(cfg: Mapping[str, object]) -> tuple[float, float, bool]:
    """(m, q, replace_one): the expected clients a round, the Poisson sampling rate, and the adjacency.

    Poisson sampling: m = fraction n, q = fraction, add/remove-one. A fixed
    number of clients: m = round(fraction n) (at least 1), q = 1, and
    replace-one adjacency when m < n (adding a client changes the whole sample;
    :mod:`fl_clip21.privacy`), add/remove-one when everyone takes part.
    """
    n, fraction = cfg["num-clients"], cfg["fraction"]
    if cfg.get("sampling", "fixed") == "poisson":
        return fraction * n, fraction, False
    m = max(1, round(fraction * n)) if fraction < 1 else n
    return float(m), 1.0, m < n


def server_sigma(cfg: Mapping[str, object]) -> float:
    """sigma in units of the clipping bound tau, as the server adds it under central DP.

    ``dp = "central"``: the scenario's sigma. DP-FedAvg (and Flower's) under
    ``dp = "local"``: sigma / 2, the multiplier sigma / (2 tau) the local-DP
    algorithms get for the same sigma (and so, at full participation, the same
    epsilon for the same ``target-epsilon``).
    """
    sigma = float(cfg.get("sigma", 0.0))
    return sigma if cfg.get("dp") == "central" else sigma / 2


def algorithm_from_config(name: str, cfg: Mapping[str, object]) -> Algorithm:
    """The algorithm ``name`` with the hyper-parameters of a resolved scenario (only the keys it takes).

    A key missing from ``cfg`` (a scenario saved before the key existed) takes the factory's default.
    """
    keys = HYPER_KEYS.get(name, ())
    hyper = {_keyword(k): cfg[k] for k in keys if k in cfg}
    central = cfg.get("dp") == "central" and name in CENTRAL_DP
    if not (central or name in DP_FEDAVG):
        return make_algorithm(name, **hyper)
    hyper.pop("sigma", None)  # the clients add no noise: the server does
    m, q, replace_one = central_sampling(cfg)
    return with_central_dp(
        make_algorithm(name, **hyper), server_sigma(cfg), m, q, replace_one=replace_one,
        secure=bool(cfg.get("secure-noise", False)),
    )
