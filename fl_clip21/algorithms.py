"""Every algorithm of docs/algorithms.md as a value that every engine takes.

An :class:`Algorithm` is a pair of client functions and a pair of server
functions (fedjax's ``init``/``apply`` split), closed over frozen
hyper-parameters. The Flower client and strategy call exactly these functions;
no engine carries its own copy of an update rule.

Symbols follow the paper: ``tau`` the clipping threshold, ``v`` the client
memory v_i, ``g`` the server aggregate, ``lr`` the server step gamma.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fl_clip21 import core
from fl_clip21.core import Params

# grad_fn(params, rng) -> the client's (possibly stochastic) gradient at params.
GradFn = Callable[[Mapping[str, np.ndarray], np.random.Generator], Params]
ClientState = dict[str, Params]
ServerState = dict[str, Params]


@dataclass(frozen=True)
class ClientResult:
    """What one client round produces."""

    message: Params  # what is sent to the server, and nothing else
    state: ClientState  # the client's new private state
    clipped: bool  # whether the contractive operator was active
    # ||update|| (the gradient, momentum or model update the client computed) and
    # ||operator input|| (Clip21: ||grad - v_i||): what a threshold tau is chosen from.
    norms: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Algorithm:
    """An algorithm as data.

    Attributes
    ----------
    name:
        Registry name (``clip21-gd``...).
    client_init:
        ``params -> ClientState``: the state a client starts with.
    client_update:
        ``(params, state, grad_fn, rng) -> ClientResult``.
    server_init:
        ``params -> ServerState``.
    server_update:
        ``(params, state, messages, n) -> (params, state)``; ``messages`` are the
        accepted replies of this round, ``n`` the number of all clients.
    message_bound:
        ``d -> bound``: the largest global norm a valid message of a model with
        ``d`` entries may have. The server rejects a message above
        ``bound * (1 + 1e-6)``. Every registered algorithm has one: its clipping
        bound, or ``message-norm-cap`` for those that do not clip (None: unbounded).
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
        z = sigma / (2 tau) of the local Gaussian mechanism, or None when the
        messages carry no DP noise.
    """

    name: str
    client_init: Callable[[Params], ClientState]
    client_update: Callable[..., ClientResult]
    server_init: Callable[[Params], ServerState]
    server_update: Callable[..., tuple[Params, ServerState]]
    message_bound: Callable[[int], float] | None = None
    stochastic: bool = False
    memory: str | None = None
    sparse: bool = False
    sparse_entries: Callable[[int], int] | None = None
    noise_multiplier: float | None = None
    hyper: Mapping[str, float] = field(default_factory=dict)


def _no_state(params: Params) -> dict:
    return {}


def model_size(params: Mapping[str, np.ndarray]) -> int:
    """d: the number of entries of the whole model."""
    return int(sum(np.size(v) for v in params.values()))


def gaussian_noise_bound(sigma: float, d: int) -> float:
    """A norm the noise N(0, sigma^2 I_d) exceeds with probability < exp(-50).

    Gaussian concentration: P(||w|| >= sigma (sqrt(d) + t)) <= exp(-t^2 / 2), t = 10.
    """
    return sigma * (np.sqrt(d) + 10.0)


def _add_noise(message: Params, sigma: float, rng: np.random.Generator) -> Params:
    if sigma == 0:
        return message
    return {k: np.asarray(v + rng.normal(0.0, sigma, size=np.shape(v)), dtype=v.dtype) for k, v in message.items()}


# --- building blocks -------------------------------------------------------


def _gradient_client(transform=None, sigma: float = 0.0):
    """Client that sends ``transform(grad)`` (or the raw gradient), plus N(0, sigma^2) noise."""

    def update(params, state, grad_fn: GradFn, rng) -> ClientResult:
        grad = grad_fn(params, rng)
        norm = core.global_norm(grad)
        if transform is None:
            return ClientResult(_add_noise(grad, sigma, rng), state, False, (norm, norm))
        msg, active = transform(grad)
        return ClientResult(_add_noise(msg, sigma, rng), state, active, (norm, norm))

    return update


def _averaging_server(lr: float, transform=None):
    """``x <- x - lr * T(mean of the messages received)``."""

    def update(params, state, messages, n):
        if not messages:
            return params, state
        direction = core.mean(messages)
        if transform is not None:
            direction, _ = transform(direction)
        return core.add(params, direction, -lr), state

    return update


def _ef_client(make_operator, memory: str = "v", beta1: float = 1.0, beta2: float = 1.0, sigma: float = 0.0):
    """Error feedback, with optional momentum and noise (Clip21, EF21, Clip21-SGD2M).

    ``m <- (1 - beta1) m + beta1 grad`` (only when beta1 < 1, state ``v``);
    ``c = C(m - mem)``, ``mem <- mem + beta2 c``; sends ``beta2 (c + noise)``.
    ``make_operator(d)`` builds C for a model of d entries.
    """
    momentum = beta1 < 1

    def init(params: Params) -> ClientState:
        state = {memory: core.zeros_like(params)}
        if momentum:
            state["v"] = core.zeros_like(params)
        return state

    def update(params, state, grad_fn: GradFn, rng) -> ClientResult:
        grad = grad_fn(params, rng)
        new_state = {}
        if momentum:
            grad = core.add(core.scale(state["v"], 1 - beta1), grad, beta1)
            new_state["v"] = grad
        res = core.error_feedback_step(grad, state[memory], make_operator(model_size(params)), beta2)
        new_state[memory] = res.memory
        msg = _add_noise(res.increment, sigma, rng)
        if beta2 != 1:
            msg = core.scale(msg, beta2)
        return ClientResult(msg, new_state, res.active, (core.global_norm(grad), res.input_norm))

    return init, update


def _ef_server(lr: float):
    """``g <- g + sum(messages) / n``, ``x <- x - lr * g`` (divides by all n)."""

    def init(params: Params) -> ServerState:
        return {"g": core.zeros_like(params)}

    def update(params, state, messages, n):
        g = state["g"]
        if messages:
            g = core.add(g, core.mean(messages, divisor=n))
        return core.add(params, g, -lr), {"g": g}

    return init, update


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
        "sgd" if stochastic else "gd", _no_state, _gradient_client(), _no_state,
        _averaging_server(lr), message_bound=bound, stochastic=stochastic,
        hyper={"lr": lr, "message-norm-cap": bound(0)},
    )


def clip_gd(*, lr: float, tau: float, sigma: float = 0.0, stochastic: bool = False) -> Algorithm:
    """Naive client-side clipping: clients send ``clip_tau(grad) + N(0, sigma^2)``."""
    lr, tau, sigma = _positive("lr", lr), _positive("tau", tau), _sigma(sigma)
    return Algorithm(
        "clip-sgd" if stochastic else "clip-gd", _no_state,
        _gradient_client(core.clip_operator(tau), sigma), _no_state, _averaging_server(lr),
        message_bound=lambda d: tau + gaussian_noise_bound(sigma, d), stochastic=stochastic,
        noise_multiplier=_noise_z(sigma, tau), hyper={"lr": lr, "tau": tau, "sigma": sigma},
    )


def server_clip_gd(*, lr: float, tau: float, message_norm_cap: float = MESSAGE_NORM_CAP) -> Algorithm:
    """Server-side clipping of the averaged gradient; clients' messages are bounded by ``message_norm_cap``."""
    lr, tau, bound = _positive("lr", lr), _positive("tau", tau), _cap(message_norm_cap)
    return Algorithm(
        "server-clip-gd", _no_state, _gradient_client(), _no_state,
        _averaging_server(lr, core.clip_operator(tau)), message_bound=bound,
        hyper={"lr": lr, "tau": tau, "message-norm-cap": bound(0)},
    )


def clip21(*, lr: float, tau: float, stochastic: bool = False) -> Algorithm:
    """Clip21-GD / Clip21-SGD: error feedback with ``C = clip_tau``."""
    lr, tau = _positive("lr", lr), _positive("tau", tau)
    op = core.clip_operator(tau)
    c_init, c_update = _ef_client(lambda d: op)
    s_init, s_update = _ef_server(lr)
    return Algorithm(
        "clip21-sgd" if stochastic else "clip21-gd", c_init, c_update, s_init, s_update,
        message_bound=lambda d: tau, stochastic=stochastic, memory="v",
        hyper={"lr": lr, "tau": tau},
    )


def clip21_sgd2m(
    *, lr: float, tau: float, beta1: float = 1.0, beta2: float = 1.0, sigma: float = 0.0
) -> Algorithm:
    """Clip21-SGD2M: client momentum beta1, error-feedback step beta2, local noise sigma."""
    lr, tau = _positive("lr", lr), _positive("tau", tau)
    beta1, beta2, sigma = _beta("beta1", beta1), _beta("beta2", beta2), _sigma(sigma)
    op = core.clip_operator(tau)
    c_init, c_update = _ef_client(lambda d: op, memory="g", beta1=beta1, beta2=beta2, sigma=sigma)
    s_init, s_update = _ef_server(lr)
    return Algorithm(
        "clip21-sgd2m", c_init, c_update, s_init, s_update,
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
    clip = core.clip_operator(_positive("tau", tau)) if tau is not None else None
    bound = (lambda d: tau) if clip else _cap(message_norm_cap)

    def make_operator(d: int):
        op = core.topk_operator(topk_count(topk, d))
        return core.compose(op, clip) if clip is not None else op

    c_init, c_update = _ef_client(make_operator)
    s_init, s_update = _ef_server(lr)
    return Algorithm(
        "clip21-topk" if clip else "ef21-topk", c_init, c_update, s_init, s_update,
        message_bound=bound, memory="v", sparse=True,
        sparse_entries=lambda d: min(topk_count(topk, d), d),
        hyper={"lr": lr, "topk": topk, **({"tau": tau} if clip else {"message-norm-cap": bound(0)})},
    )


def celgc(*, lr: float, tau: float, local_steps: int = 1) -> Algorithm:
    """CELGC: I local steps ``y <- y - min(eta, gamma_c / ||g||) g`` from x, then model averaging.

    With eta = lr and gamma_c = lr * tau each local step is ``y - lr * clip_tau(g)``.
    Clients send ``x - y`` (the server's new model is the mean of the y_i).
    """
    lr, tau = _positive("lr", lr), _positive("tau", tau)
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"local-steps must be an integer >= 1, got {local_steps!r}")
    op = core.clip_operator(tau)

    def update(params, state, grad_fn: GradFn, rng) -> ClientResult:
        y, active, first = params, False, None
        for _ in range(local_steps):
            grad = grad_fn(y, rng)
            first = core.global_norm(grad) if first is None else first
            step, a = op(grad)
            y, active = core.add(y, step, -lr), active or a
        update = core.add(params, y, -1.0)
        return ClientResult(update, state, active, (core.global_norm(update), first))

    return Algorithm(
        "celgc", _no_state, update, _no_state, _averaging_server(1.0),
        message_bound=lambda d: local_steps * lr * tau, stochastic=True,
        hyper={"lr": lr, "tau": tau, "local-steps": local_steps},
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
}
ALGORITHMS: dict[str, Callable[..., Algorithm]] = {name: factory for name, (factory, _) in _REGISTRY.items()}
# The scenario keys each algorithm takes: algorithm_from_config passes it these and no others.
HYPER_KEYS: dict[str, tuple[str, ...]] = {name: keys for name, (_, keys) in _REGISTRY.items()}
# Run by Flower's own strategy (fl_clip21.flower.dp_baseline), not an Algorithm value.
FLOWER_BASELINES = ("flower-dp-fixed",)


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


def algorithm_from_config(name: str, cfg: Mapping[str, object]) -> Algorithm:
    """The algorithm ``name`` with the hyper-parameters of a resolved scenario (only the keys it takes).

    A key missing from ``cfg`` (a scenario saved before the key existed) takes the factory's default.
    """
    keys = HYPER_KEYS.get(name, ())
    return make_algorithm(name, **{_keyword(k): cfg[k] for k in keys if k in cfg})
