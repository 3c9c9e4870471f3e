"""Pure array maths shared by every engine: norms, clipping, Top-k, error feedback.

Inside the engines a model is one flat vector and a batch of clients an (m, d)
array (fl_clip21.layout); the operators act on such batches row by row. At the
edges (wire records, checkpoints, audits) a model is a ``Params`` mapping of
array names to numpy arrays, and a norm is the global L2 norm over every array
(docs/algorithms.md). Nothing here imports Flower, and no function changes its
inputs in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from fl_clip21 import backend, kernels

Params = dict[str, np.ndarray]


def zeros_like(params: Mapping[str, np.ndarray]) -> Params:
    """A new zero array for every array of ``params`` (same shapes and dtypes)."""
    return {k: np.zeros_like(v) for k, v in params.items()}


def global_norm(params: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all arrays taken together, computed in float64.

    Entries so large that their squares overflow, or so small that they
    underflow, are handled by rescaling with the largest magnitude first.
    """
    flats = [np.asarray(v, dtype=np.float64).ravel() for v in params.values()]
    with np.errstate(over="ignore", under="ignore"):
        total = sum(float(np.dot(a, a)) for a in flats)
    if 1e-280 < total < math.inf:
        return math.sqrt(total)
    peak = max((float(np.max(np.abs(a))) for a in flats if a.size), default=0.0)
    if peak == 0 or not math.isfinite(peak):
        return peak
    return peak * math.sqrt(sum(float(np.dot(a / peak, a / peak)) for a in flats))


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], scale: float = 1.0) -> Params:
    """``a + scale * b``, key by key, as new arrays."""
    return {k: np.asarray(a[k] + scale * b[k], dtype=a[k].dtype) for k in a}


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """``max |a - b|`` over every entry of every array (0 for empty arrays)."""
    return max((float(np.max(np.abs(a[k] - b[k]))) for k in a if np.size(a[k])), default=0.0)


def mean(items: list[Mapping[str, np.ndarray]], divisor: int | None = None) -> Params:
    """Sum of ``items`` divided by ``divisor`` (default: their count)."""
    if not items:
        raise ValueError("mean needs at least one array dict, got none")
    n = len(items) if divisor is None else divisor
    total = {k: np.array(v, dtype=np.float64) for k, v in items[0].items()}
    for it in items[1:]:
        for k in total:
            total[k] += it[k]
    return {k: (total[k] / n).astype(items[0][k].dtype) for k in total}


# --- batches of flat vectors -----------------------------------------------------
#
# Every engine holds a batch of clients as an (m, d) array, one flattened model
# per row (fl_clip21.layout). The operators below act row by row with no Python
# loop over the rows; a per-row threshold (an (m,) array) serves batched sweeps.
# The arrays are numpy's or torch's (fl_clip21.backend): the operators compute on
# the backend of their input. docs/algorithms.md, "The error-feedback step".

# op(Y, inplace=False, rows=None) -> (C, active, norms); with inplace the operator may write C
# into Y; ``rows`` (a slice) says which rows of the batch Y holds, for per-row parameters.
RowOperator = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def row_norms(Y: np.ndarray) -> np.ndarray:
    """The L2 norm of every row of ``Y`` (m, d), in float64, without overflow or underflow."""
    return backend.of(Y).row_norms(Y)


def clip_rows(tau: float | np.ndarray) -> RowOperator:
    """clip_tau on every row: ``min(1, tau / ||y||) y``, and 0 for a zero row (no division by zero).

    ``tau`` is a number or an (m,) array of one threshold per row. The operator
    returns ``(C, active, norms)``: the clipped rows, whether clipping changed
    each row (``||y|| > tau``), and the rows' norms before clipping.
    """
    t = np.asarray(tau, dtype=np.float64)
    if not np.all(t > 0):
        raise ValueError(f"tau must be > 0, got {tau!r}")

    def op(
        Y: np.ndarray, inplace: bool = False, rows: slice | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xp = backend.of(Y)
        norms = xp.row_norms(Y)
        tau_rows = xp.asarray(t[rows] if rows is not None else t) if t.ndim else float(t)
        active = norms > tau_rows
        with np.errstate(divide="ignore"):
            factor = xp.where(active, tau_rows / xp.where(active, norms, 1.0), 1.0)
        column = xp.cast(factor[:, None], Y.dtype)
        return xp.multiply(Y, column, out=Y if inplace else None), active, norms

    op.clip_tau = t  # what ef_step_rows hands to the compiled loop (fl_clip21.kernels)
    return op


def topk_rows(k: int) -> RowOperator:
    """Top-k on every row: keep the k entries of largest magnitude (ties: numpy's introselect, torch's topk).

    ``active`` is True for a row whose dropped entries were not all zero.
    """
    if k < 1:
        raise ValueError(f"topk must be >= 1, got {k!r}")

    def op(
        Y: np.ndarray, inplace: bool = False, rows: slice | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xp = backend.of(Y)
        norms = xp.row_norms(Y)
        m, d = Y.shape
        if k >= d:
            return xp.copy(Y), xp.zeros(m, dtype=bool), norms
        C = xp.keep_entries(Y, xp.top_indices(Y, k))
        active = xp.count_nonzero_rows(Y) > xp.count_nonzero_rows(C)
        return C, active, norms

    return op


def compose_rows(*ops: RowOperator) -> RowOperator:
    """Apply ``ops`` left to right; active if any was; the norms are the input's."""

    def op(
        Y: np.ndarray, inplace: bool = False, rows: slice | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out, active, norms = ops[0](Y, inplace, rows)
        for f in ops[1:]:
            out, a, _ = f(out, True, rows)  # the first operator's output is ours to overwrite
            active = active | a
        return out, active, norms

    return op


class RowStep(NamedTuple):
    """One error-feedback step of a batch of clients."""

    increment: np.ndarray  # (m, d): C(target - memory), what each client sends
    memory: np.ndarray  # (m, d): memory + step * increment
    active: np.ndarray  # (m,) bool: whether the operator changed a row
    input_norms: np.ndarray  # (m,): ||target - memory|| per row
    target_norms: np.ndarray  # (m,): ||target|| per row


def ef_step_rows(
    target: np.ndarray, memory: np.ndarray, op: RowOperator, step: float | np.ndarray = 1.0,
    overwrite_target: bool = False, overwrite_memory: bool = False,
) -> RowStep:
    """``C = op(target - memory)``, ``memory + step C``, row by row (Clip21, EF21, SGD2M's memory).

    With ``overwrite_target`` the difference and C are computed in ``target``'s
    buffer, with ``overwrite_memory`` the new memory in ``memory``'s: a batch of
    many clients then moves each (m, d) array as few times as it can. On numpy
    the rows go in blocks that stay in the core's cache (``block_rows``): every
    pass of a block (norms, difference, operator, memory) reads it from there,
    not from main memory. Each row's numbers do not depend on the blocks. A
    clip (:func:`clip_rows`) on numpy arrays runs as one compiled loop where
    numba is installed (fl_clip21.kernels): each row read from memory once.
    """
    xp = backend.of(memory)
    m = memory.shape[0]
    tau = getattr(op, "clip_tau", None)
    if (tau is not None and np.size(tau) in (1, m) and np.size(step) in (1, m)
            and kernels.usable(target, memory) and target.shape == memory.shape
            and not np.may_share_memory(target, memory)):
        step_rows = None if np.ndim(step) == 0 and step == 1 else np.asarray(step, dtype=np.float64)
        return RowStep(*kernels.clip_ef_step(target, memory, tau, step_rows, overwrite_target, overwrite_memory))
    block = xp.block_rows(memory)
    increment = target if overwrite_target else xp.zeros(target.shape, target.dtype)
    new_memory = memory if overwrite_memory else xp.zeros(memory.shape, memory.dtype)
    active, input_norms, target_norms = xp.zeros(m, bool), xp.zeros(m), xp.zeros(m)
    scale = None if np.ndim(step) == 0 and step == 1 else xp.asarray(step, dtype=memory.dtype)
    for a in range(0, m, block):
        rows = slice(a, min(a + block, m))
        target_norms[rows] = xp.row_norms(target[rows])
        diff = xp.subtract(target[rows], memory[rows], out=increment[rows])
        c, active[rows], input_norms[rows] = op(diff, True, rows)
        if c is not diff:  # an operator that does not work in place (Top-k)
            increment[rows] = c
        scaled = c if scale is None else (scale[rows, None] if scale.ndim else scale) * c
        xp.add(memory[rows], scaled, out=new_memory[rows])
    return RowStep(increment, new_memory, active, input_norms, target_norms)
