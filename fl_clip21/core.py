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
# docs/algorithms.md, "The error-feedback step".

# op(Y, inplace=False) -> (C, active, norms); with inplace the operator may write C into Y.
RowOperator = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def row_norms(Y: np.ndarray) -> np.ndarray:
    """The L2 norm of every row of ``Y`` (m, d), in float64, without overflow or underflow."""
    Y = np.asarray(Y)
    flat = Y.reshape(int(np.prod(Y.shape[:-1])), Y.shape[-1]) if Y.ndim > 1 else Y[None, :]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
    bad = ~((sq > 1e-280) & (sq < math.inf))
    if bad.any():  # rescale the rows whose squares overflow or underflow
        rows = flat[bad].astype(np.float64)
        peak = np.max(np.abs(rows), axis=1, initial=0.0)
        safe = np.where((peak > 0) & np.isfinite(peak), peak, 1.0)
        with np.errstate(invalid="ignore"):
            scaled = peak * np.sqrt(np.einsum("ij,ij->i", rows / safe[:, None], rows / safe[:, None]))
        sq = np.sqrt(sq)
        sq[bad] = np.where((peak > 0) & np.isfinite(peak), scaled, peak)
        return sq.reshape(Y.shape[:-1]) if Y.ndim > 1 else sq[0]
    out = np.sqrt(sq)
    return out.reshape(Y.shape[:-1]) if Y.ndim > 1 else out[0]


def clip_rows(tau: float | np.ndarray) -> RowOperator:
    """clip_tau on every row: ``min(1, tau / ||y||) y``, and 0 for a zero row (no division by zero).

    ``tau`` is a number or an (m,) array of one threshold per row. The operator
    returns ``(C, active, norms)``: the clipped rows, whether clipping changed
    each row (``||y|| > tau``), and the rows' norms before clipping.
    """
    t = np.asarray(tau, dtype=np.float64)
    if not np.all(t > 0):
        raise ValueError(f"tau must be > 0, got {tau!r}")

    def op(Y: np.ndarray, inplace: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        norms = row_norms(Y)
        active = norms > t
        with np.errstate(divide="ignore"):
            factor = np.where(active, t / np.where(active, norms, 1.0), 1.0)
        column = factor[:, None].astype(Y.dtype, copy=False)
        return np.multiply(Y, column, out=Y if inplace else None), active, norms

    return op


def topk_rows(k: int) -> RowOperator:
    """Top-k on every row: keep the k entries of largest magnitude (ties: numpy's introselect).

    ``active`` is True for a row whose dropped entries were not all zero.
    """
    if k < 1:
        raise ValueError(f"topk must be >= 1, got {k!r}")

    def op(Y: np.ndarray, inplace: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        norms = row_norms(Y)
        m, d = Y.shape
        if k >= d:
            return Y.copy(), np.zeros(m, dtype=bool), norms
        keep = np.argpartition(np.abs(Y), d - k, axis=1)[:, d - k :]
        rows = np.arange(m)[:, None]
        C = np.zeros_like(Y)
        C[rows, keep] = Y[rows, keep]
        active = np.count_nonzero(Y, axis=1) > np.count_nonzero(C, axis=1)
        return C, active, norms

    return op


def compose_rows(*ops: RowOperator) -> RowOperator:
    """Apply ``ops`` left to right; active if any was; the norms are the input's."""

    def op(Y: np.ndarray, inplace: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out, active, norms = ops[0](Y, inplace)
        for f in ops[1:]:
            out, a, _ = f(out, True)  # the first operator's output is ours to overwrite
            active = active | a
        return out, active, norms

    return op


class RowStep(NamedTuple):
    """One error-feedback step of a batch of clients."""

    increment: np.ndarray  # (m, d): C(target - memory), what each client sends
    memory: np.ndarray  # (m, d): memory + step * increment
    active: np.ndarray  # (m,) bool: whether the operator changed a row
    input_norms: np.ndarray  # (m,): ||target - memory|| per row


def ef_step_rows(
    target: np.ndarray, memory: np.ndarray, op: RowOperator, step: float | np.ndarray = 1.0,
    overwrite_target: bool = False, overwrite_memory: bool = False,
) -> RowStep:
    """``C = op(target - memory)``, ``memory + step C``, row by row (Clip21, EF21, SGD2M's memory).

    With ``overwrite_target`` the difference and C are computed in ``target``'s
    buffer, with ``overwrite_memory`` the new memory in ``memory``'s: a batch of
    many clients then moves each (m, d) array as few times as it can.
    """
    diff = np.subtract(target, memory, out=target if overwrite_target else None)
    c, active, norms = op(diff, True)
    s = np.asarray(step, dtype=memory.dtype)
    increment = c if s.ndim == 0 and s == 1 else (s[:, None] if s.ndim else s) * c
    new_memory = np.add(memory, increment, out=memory if overwrite_memory else None)
    return RowStep(c, new_memory, active, norms)
