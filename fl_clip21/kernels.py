"""Compiled loops for the numpy backend's two heaviest passes, with numba (optional: ``pip install fl-clip21[fast]``).

numpy runs a batch's error-feedback step as half a dozen calls over the
(m, d) arrays (the target's norms, the difference, its norms, the scaling,
the memory update), each reading and writing the batch, and the logistic
regression's per-client gradients as a scipy CSR product. Here each is one
loop over the rows: a row is read from memory once and every later pass over
it hits the core's cache (docs/benchmarks.md, "The batched engine").

The numbers are numpy's, with one exception: a row's sum of squares is
summed in another order (vectorised), so a norm, and what a clip does with
it, can differ from numpy's in the last bit. The CSR product's sums are
scipy's, in scipy's order, bit for bit. Both engines call the same kernels
(the Flower client's batch of one row goes through them too), so the kernels
add no difference between the engines; a run with and without numba agrees
to float rounding (tests/test_kernels.py).

``FL_CLIP21_KERNELS=numpy`` in the environment turns them off; without numba
they are off, and nothing else changes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

try:  # an optional dependency: the "fast" extra
    import numba
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

# Whether the compiled loops run (tests switch it to compare both ways).
ENABLED = numba is not None and os.environ.get("FL_CLIP21_KERNELS", "numba") != "numpy"

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
    if not ENABLED:
        return False
    first = arrays[0]
    return all(
        type(a) is np.ndarray and a.ndim == 2 and a.flags.c_contiguous and a.dtype == first.dtype
        and a.dtype in _FLOATS for a in arrays
    )


if numba is not None:
    # reassoc: the sum of squares may be summed in any order (vectorised); nothing else is reordered,
    # and no multiply-add is contracted, so every other operation rounds as numpy's does.
    _jit = numba.njit(cache=True, nogil=True)
    _jit_sum = numba.njit(cache=True, nogil=True, fastmath={"reassoc"})

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
