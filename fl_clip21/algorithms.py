"""Every algorithm of ALGORITHMS.md as a value that every engine takes.

An :class:`Algorithm` is a pair of client functions and a pair of server
functions (fedjax's ``init``/``apply`` split), closed over frozen
hyper-parameters. The Flower client and strategy call exactly these functions;
no engine carries its own copy of an update rule.

Symbols follow the paper: ``tau`` the clipping threshold, ``v`` the client
memory v_i, ``g`` the server aggregate, ``lr`` the server step gamma.
"""

from __future__ import annotations

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
        Largest global norm a valid message may have (None: unbounded). The
        server rejects any message above ``bound * (1 + 1e-6)``.
    stochastic:
        Whether clients use minibatch gradients.
    """

    name: str
    client_init: Callable[[Params], ClientState]
    client_update: Callable[..., ClientResult]
    server_init: Callable[[Params], ServerState]
    server_update: Callable[..., tuple[Params, ServerState]]
    message_bound: float | None = None
    stochastic: bool = False
    error_feedback: bool = False
    hyper: Mapping[str, float] = field(default_factory=dict)


def _no_state(params: Params) -> dict:
    return {}


# --- building blocks -------------------------------------------------------


def _gradient_client(transform: Callable[[Params], tuple[Params, bool]] | None):
    """Client that sends ``transform(grad)`` (or the raw gradient)."""

    def update(params, state, grad_fn: GradFn, rng) -> ClientResult:
        grad = grad_fn(params, rng)
        if transform is None:
            return ClientResult(grad, state, False)
        msg, active = transform(grad)
        return ClientResult(msg, state, active)

    return update


def _averaging_server(lr: float, transform: Callable[[Params], tuple[Params, bool]] | None = None):
    """``x <- x - lr * T(mean of the messages received)``."""

    def update(params, state, messages, n):
        if not messages:
            return params, state
        direction = core.mean(messages)
        if transform is not None:
            direction, _ = transform(direction)
        return core.add(params, direction, -lr), state

    return update


def _ef_client(operator, step: float = 1.0):
    """Error feedback: ``c = C(grad - v)``, ``v <- v + step * c``; sends ``c``."""

    def init(params: Params) -> ClientState:
        return {"v": core.zeros_like(params)}

    def update(params, state, grad_fn: GradFn, rng) -> ClientResult:
        grad = grad_fn(params, rng)
        res = core.error_feedback_step(grad, state["v"], operator, step)
        return ClientResult(res.increment, {"v": res.memory}, res.active)

    return init, update


def _ef_server(lr: float, scale: float = 1.0):
    """``g <- g + scale * sum(c_i) / n``, ``x <- x - lr * g`` (divides by all n)."""

    def init(params: Params) -> ServerState:
        return {"g": core.zeros_like(params)}

    def update(params, state, messages, n):
        g = state["g"]
        if messages:
            g = core.add(g, core.mean(messages, divisor=n), scale)
        return core.add(params, g, -lr), {"g": g}

    return init, update


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


# --- the registry ----------------------------------------------------------


def gd(*, lr: float, stochastic: bool = False, **_: object) -> Algorithm:
    """Distributed (S)GD: clients send gradients, the server averages them."""
    lr = _check_positive("lr", lr)
    return Algorithm(
        "sgd" if stochastic else "gd", _no_state, _gradient_client(None), _no_state,
        _averaging_server(lr), stochastic=stochastic, hyper={"lr": lr},
    )


def clip_gd(*, lr: float, tau: float, stochastic: bool = False, **_: object) -> Algorithm:
    """Naive client-side clipping: clients send ``clip_tau(grad)``."""
    lr, tau = _check_positive("lr", lr), _check_positive("tau", tau)
    return Algorithm(
        "clip-sgd" if stochastic else "clip-gd", _no_state,
        _gradient_client(core.clip_operator(tau)), _no_state, _averaging_server(lr),
        message_bound=tau, stochastic=stochastic, hyper={"lr": lr, "tau": tau},
    )


def server_clip_gd(*, lr: float, tau: float, **_: object) -> Algorithm:
    """Server-side clipping of the averaged gradient."""
    lr, tau = _check_positive("lr", lr), _check_positive("tau", tau)
    return Algorithm(
        "server-clip-gd", _no_state, _gradient_client(None), _no_state,
        _averaging_server(lr, core.clip_operator(tau)), hyper={"lr": lr, "tau": tau},
    )


def clip21(*, lr: float, tau: float, stochastic: bool = False, **_: object) -> Algorithm:
    """Clip21-GD / Clip21-SGD: error feedback with ``C = clip_tau``."""
    lr, tau = _check_positive("lr", lr), _check_positive("tau", tau)
    c_init, c_update = _ef_client(core.clip_operator(tau))
    s_init, s_update = _ef_server(lr)
    return Algorithm(
        "clip21-sgd" if stochastic else "clip21-gd", c_init, c_update, s_init, s_update,
        message_bound=tau, stochastic=stochastic, error_feedback=True,
        hyper={"lr": lr, "tau": tau},
    )


ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
    "gd": gd,
    "sgd": lambda **kw: gd(stochastic=True, **kw),
    "clip-gd": clip_gd,
    "clip-sgd": lambda **kw: clip_gd(stochastic=True, **kw),
    "server-clip-gd": server_clip_gd,
    "clip21-gd": clip21,
    "clip21-sgd": lambda **kw: clip21(stochastic=True, **kw),
}


def make_algorithm(name: str, **hyper: object) -> Algorithm:
    """Build the algorithm registered as ``name`` from hyper-parameters."""
    try:
        factory = ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"algorithms: unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}"
        ) from None
    return factory(**hyper)


def algorithm_from_config(name: str, cfg: Mapping[str, object]) -> Algorithm:
    """The algorithm ``name`` with the hyper-parameters of a resolved scenario."""
    return make_algorithm(name, lr=cfg["lr"], tau=cfg["tau"])
