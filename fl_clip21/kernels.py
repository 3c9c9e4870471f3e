"""Compiled loops for the numpy backend's heaviest passes, with numba (optional: ``pip install fl-clip21[fast]``).

numpy runs a batch's error-feedback step as half a dozen calls over the
(m, d) arrays (the target's norms, the difference, its norms, the scaling,
the memory update), each reading and writing the batch, and logistic
regression's evaluation as a product with X for the margins, then a scipy
CSR product over X again for the per-client gradients. Here each is one loop
over the rows: a row is read from memory once and every later pass over it
hits the core's cache (docs/benchmarks.md, "The batched engine"):

- :func:`clip_ef_step`: ``C = clip_tau(target - memory)``, ``memory + step C``;
- :func:`logreg_evaluate`: every client's margins, losses, accuracy and full
  gradient, and their sum, in one pass over X; logistic regression's full
  gradients (``LogReg.grads`` without a minibatch) come from the same loop, so
  a client's gradient is the same numbers whichever engine asks for it;
- :func:`row_sums`: the CSR product of minibatch gradients, scipy's sums in
  scipy's order, bit for bit.

The numbers are numpy's to float rounding: a row's sum of squares and a
row's margin are summed in another (vectorised) order than numpy's and
BLAS's, and exp and log1p are libm's rather than numpy's. Everything else
rounds as numpy does (no multiply-add is contracted). Both engines call the
same loops (the Flower client's batch of one row goes through them too), so
the loops add no difference between the engines; a run with and without
numba agrees to float rounding (tests/test_kernels.py).

``FL_CLIP21_KERNELS=numpy`` in the environment turns them off (``numba``, the
default, leaves them on; any other value is refused by the CLI); without
numba they are off, and nothing else changes.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np

try:  # an optional dependency: the "fast" extra
    import numba
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

_CHOICE = os.environ.get("FL_CLIP21_KERNELS", "numba")
# Another value is a mistake: the CLI stops on it (exit 2); a library import warns once and runs numpy's code.
ENV_ERROR = (
    None if _CHOICE in ("numba", "numpy") else f"FL_CLIP21_KERNELS must be 'numba' or 'numpy', got {_CHOICE!r}"
)
# Whether the compiled loops run (tests switch it to compare both ways).
ENABLED = numba is not None and _CHOICE == "numba"
_warned = False

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def name() -> str:
    """What runs the loops: ``numba <version>``, or ``numpy`` (not installed, or turned off)."""
    return f"numba {numba.__version__}" if ENABLED else "numpy"


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """The compiled loops on (where numba is installed) or off inside the block; as they were after it."""
    global ENABLED
    before = ENABLED
    ENABLED = on and numba is not None
    try:
        yield
    finally:
        ENABLED = before


def usable(*arrays: np.ndarray) -> bool:
    """Whether the kernels take these arrays: numpy, C-contiguous, 2-D, float32 or float64, one dtype."""
    global _warned
    if ENV_ERROR is not None and not _warned:
        _warned = True
        warnings.warn(f"{ENV_ERROR}: the compiled loops are off, numpy's code runs", stacklevel=2)
    if not ENABLED:
        return False
    first = arrays[0]
    return all(
        type(a) is np.ndarray and a.ndim == 2 and a.flags.c_contiguous and a.dtype == first.dtype
        and a.dtype in _FLOATS for a in arrays
    )


if numba is not None:
    # reassoc (sums of squares and margins only): summed in any order (vectorised); nothing else is reordered,
    # and no multiply-add is contracted, so every other operation rounds as numpy's does.
    def _compiled(**flags):
        """numba.njit with its on-disk cache, or without one where the install has nowhere to write it."""

        def wrap(function):
            try:
                return numba.njit(cache=True, nogil=True, **flags)(function)
            except RuntimeError:  # "no locator available": a read-only install, no writable cache dir
                return numba.njit(cache=False, nogil=True, **flags)(function)

        return wrap

    _jit = _compiled()
    _jit_sum = _compiled(fastmath={"reassoc"})

    @_jit_sum
    def _sum_squares(a):  # pragma: no cover - compiled
        s = 0.0
        for j in range(a.shape[0]):
            y = np.float64(a[j])
            s += y * y
        return s

    @_jit
    def _norm(a):  # pragma: no cover - compiled
        """``row_norms`` of one row: float64, rescaled by the largest magnitude where squares overflow or underflow."""
        s = _sum_squares(a)
        if s > 1e-280 and s < np.inf:
            return np.sqrt(s)
        peak = 0.0
        for j in range(a.shape[0]):
            y = abs(np.float64(a[j]))
            if y != y:
                return y  # NaN, as numpy's max of a row holding one
            if y > peak:
                peak = y
        if peak == 0.0 or peak == np.inf:
            return peak
        t = 0.0
        for j in range(a.shape[0]):
            y = np.float64(a[j]) / peak
            t += y * y
        return peak * np.sqrt(t)

    @_jit
    def _clip_ef_step(C, V, tau, step, active, input_norms, target_norms, cast):  # pragma: no cover - compiled
        # In place: C holds the targets and gets the increments, V the memories and gets the new ones
        # (two buffers the loop knows apart run 1.5x faster than four views that may alias).
        m, d = C.shape
        per_row_tau, scaled, per_row_step = tau.shape[0] > 1, step.shape[0] > 0, step.shape[0] > 1
        for i in range(m):
            c, v = C[i], V[i]
            target_norms[i] = _norm(c)
            for j in range(d):
                c[j] = c[j] - v[j]
            norm = _norm(c)
            input_norms[i] = norm
            limit = tau[i] if per_row_tau else tau[0]
            clipped = norm > limit
            active[i] = clipped
            if clipped:
                cast[0] = limit / norm  # the factor in the rows' dtype, as numpy casts it
                f = cast[0]
                for j in range(d):
                    c[j] = c[j] * f
            if scaled:
                cast[0] = step[i] if per_row_step else step[0]
                s = cast[0]
                for j in range(d):
                    v[j] = v[j] + s * c[j]
            else:
                for j in range(d):
                    v[j] = v[j] + c[j]

    @_jit
    def _row_sums(values, X, rows, indptr, out, total):  # pragma: no cover - compiled
        d = X.shape[1]
        keep_total = total.shape[0] > 0
        for i in range(indptr.shape[0] - 1):
            o = out[i]
            for j in range(d):
                o[j] = 0.0
            for k in range(indptr[i], indptr[i + 1]):
                a = values[k]
                x = X[rows[k]]
                for j in range(d):
                    o[j] += a * x[j]
            if keep_total:  # while the row is in the cache
                for j in range(d):
                    total[j] += o[j]

    @_jit_sum
    def _dot(a, b):  # pragma: no cover - compiled
        s = 0.0
        for j in range(a.shape[0]):
            s += a[j] * b[j]
        return s

    @_jit
    def _logreg_evaluate(X, signs, x, reg_row, starts, sizes, out, total):  # pragma: no cover - compiled
        # Client after client, row after row: the margin, the loss and the weight, then the row added
        # into the client's gradient while it is in the cache: X read from memory once.
        d = X.shape[1]
        keep = out.shape[0] == starts.shape[0]
        data_loss, correct = 0.0, 0
        for i in range(starts.shape[0]):
            o = out[i] if keep else out[0]
            for j in range(d):
                o[j] = 0.0
            weight = 1.0 / sizes[i]
            client_loss = 0.0
            for r in range(starts[i], starts[i] + sizes[i]):
                row = X[r]
                z = _dot(row, x)
                sign = signs[r]
                margin = sign * z
                e = np.exp(-abs(margin))
                client_loss += max(-margin, 0.0) + np.log1p(e)  # log(1 + exp(-margin)), no overflow
                sigmoid = (e if margin > 0 else 1.0) / (1.0 + e)  # 1 / (1 + exp(margin)), no overflow
                a = -sign * sigmoid * weight  # -y sigmoid(-y z) / |P_i|
                if (z > 0) == (sign > 0):
                    correct += 1
                for j in range(d):
                    o[j] += a * row[j]
            for j in range(d):
                o[j] += reg_row[j]
                total[j] += o[j]
            data_loss += client_loss / sizes[i]
        return data_loss / starts.shape[0], correct


def clip_ef_step(
    target: np.ndarray, memory: np.ndarray, tau: np.ndarray, step: np.ndarray | None,
    overwrite_target: bool = False, overwrite_memory: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``C = clip_tau(target - memory)``, ``memory + step * C``, one pass per row.

    ``tau``: one threshold or one per row; ``step``: None for 1, else one
    value or one per row. With ``overwrite_target`` C is written into
    ``target``'s buffer, with ``overwrite_memory`` the new memory into
    ``memory``'s (else into copies). Returns ``(C, new_memory, active,
    input_norms, target_norms)``, as :func:`fl_clip21.core.ef_step_rows` does.
    """
    if target.shape != memory.shape or np.size(tau) not in (1, target.shape[0]) or (
            step is not None and np.size(step) not in (1, target.shape[0])):
        raise ValueError(f"clip_ef_step: target {target.shape}, memory {memory.shape}, tau {np.shape(tau)} and "
                         f"step {np.shape(step)} do not fit")  # the loop does not check its indices
    C = target if overwrite_target else target.copy()
    V = memory if overwrite_memory else memory.copy()
    m = C.shape[0]
    active, input_norms, target_norms = np.zeros(m, dtype=bool), np.zeros(m), np.zeros(m)
    steps = np.zeros(0) if step is None else np.ascontiguousarray(step, dtype=np.float64).ravel()
    _clip_ef_step(
        C, V, np.ascontiguousarray(tau, dtype=np.float64).ravel(), steps, active, input_norms, target_norms,
        np.zeros(1, dtype=C.dtype),
    )
    return C, V, active, input_norms, target_norms


def row_sums(
    values: np.ndarray, X: np.ndarray, rows: np.ndarray, indptr: np.ndarray, with_total: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """(m, d): row i the sum over k in [indptr[i], indptr[i+1]) of values[k] X[rows[k]], in scipy's CSR order.

    ``with_total``: also the sum of those m rows (summed row after row, while each is in the cache).
    """
    out = np.empty((indptr.shape[0] - 1, X.shape[1]), dtype=np.float64)
    total = np.zeros(X.shape[1] if with_total else 0)
    _row_sums(values, X, rows, indptr, out, total)
    return (out, total) if with_total else out


def logreg_evaluate(
    X: np.ndarray, signs: np.ndarray, x: np.ndarray, reg_row: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
    client_grads: bool,
) -> tuple[float, int, np.ndarray, np.ndarray | None]:
    """Logistic regression's evaluation in one pass over X: ``(mean data loss, correct rows, sum of the
    clients' gradients, every client's gradient or None)``.

    Client i owns rows ``starts[i] : starts[i] + sizes[i]`` (every size > 0) of ``X``,
    with labels ``signs`` (+-1); its loss is the mean of log(1 + exp(-y z)) over its rows,
    its gradient the mean of -y sigmoid(-y z) a over them plus ``reg_row``.
    """
    n, d = starts.shape[0], X.shape[1]
    # The loop does not check its indices: every shape is checked here.
    if x.shape != (d,) or reg_row.shape != (d,) or signs.shape != (X.shape[0],) or sizes.shape != (n,):
        raise ValueError(f"logreg_evaluate: shapes x {x.shape}, reg_row {reg_row.shape}, signs {signs.shape}, "
                         f"sizes {sizes.shape} do not fit X {X.shape} and {n} clients")
    if n and (starts.min() < 0 or sizes.min() < 1 or (starts + sizes).max() > X.shape[0]):
        raise ValueError(f"logreg_evaluate: client rows outside X's {X.shape[0]} rows, or a client without rows")
    out = np.empty((n if client_grads else 1, d))
    total = np.zeros(d)
    data_loss, correct = _logreg_evaluate(X, signs, x, reg_row, starts, sizes, out, total)
    return data_loss, correct, total, out if client_grads else None
