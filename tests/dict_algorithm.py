"""An algorithm's batched functions driven one client at a time, on array dicts: for hand-computed tests.

The tests of the update rules compute expected values by hand for named
arrays; these helpers flatten them (fl_clip21.layout), call the algorithm's
client function on a batch of one and its server function on the stacked
messages, and unflatten the results.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from fl_clip21.layout import Layout


def client_init(alg, x):
    layout = Layout.of(x)
    return {k: layout.unflatten(v[0]) for k, v in alg.client_init(1, layout.size, layout.dtype).items()}


def server_init(alg, x):
    layout = Layout.of(x)
    return {k: layout.unflatten(v) for k, v in alg.server_init(layout.size, layout.dtype).items()}


def client_update(alg, x, state, grad_fn, rng=None, noise=None):
    """One client's round: ``grad_fn(params, rng) -> gradient`` (array dicts), ``state`` its state."""
    layout = Layout.of(x)

    def grads(points, step):
        rows = points if points.ndim == 2 else points[None, :]
        return np.stack([layout.flatten(grad_fn(layout.unflatten(p), rng)) for p in rows])

    state_rows = {k: layout.flatten(v)[None, :] for k, v in state.items()}
    out = alg.client_round(layout.flatten(x), state_rows, grads, noise)
    return SimpleNamespace(
        message=layout.unflatten(out.messages[0]), state={k: layout.unflatten(v[0]) for k, v in out.state.items()},
        clipped=bool(out.active[0]), norms=tuple(out.norms[0]),
    )


def server_update(alg, x, state, messages, n):
    layout = Layout.of(x)
    rows = layout.flatten_rows(messages) if messages else layout.zeros(0)
    new_x, new_state = alg.server_round(layout.flatten(x), {k: layout.flatten(v) for k, v in state.items()}, rows, n)
    return layout.unflatten(new_x), {k: layout.unflatten(v) for k, v in new_state.items()}


def apply_rows(op, y):
    """A row operator of fl_clip21.core on one array dict: ``(C(y), active)`` as an array dict."""
    layout = Layout.of(y)
    out, active, _ = op(layout.flatten(y)[None, :])
    return layout.unflatten(out[0]), bool(active[0])


def clip(y, tau):
    """clip_tau of the whole model ``y`` (an array dict), through :func:`fl_clip21.core.clip_rows`."""
    from fl_clip21 import core

    return apply_rows(core.clip_rows(tau), y)


def ef_step(target, memory, op, step=1.0):
    """:func:`fl_clip21.core.ef_step_rows` on one client's array dicts."""
    from fl_clip21 import core

    layout = Layout.of(memory)
    res = core.ef_step_rows(layout.flatten(target)[None, :], layout.flatten(memory)[None, :], op, step)
    return SimpleNamespace(
        increment=layout.unflatten(res.increment[0]), memory=layout.unflatten(res.memory[0]),
        active=bool(res.active[0]), input_norm=float(res.input_norms[0]),
    )
