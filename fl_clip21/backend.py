"""Where the batched engine's arrays live: numpy (the default), or torch on a device (``device=cpu|cuda``).

The update rules (fl_clip21.algorithms), the row operators (fl_clip21.core)
and the built-in problems are written once; the few operations whose
spelling differs between numpy and torch are methods of a backend, chosen by
the type of the arrays at hand (:func:`of`). numpy's are the calls the code
made before there was a choice, so a numpy run and the Flower engine (which
always computes on numpy, one client at a time) give the numbers they gave.
Torch's compute the same maths, in the same dtypes, in other summation
orders: a torch run's trajectory equals numpy's to float rounding
(docs/algorithms.md, "Backends"). Host-side work stays on numpy on every
backend: sampling, minibatch indices, stragglers, privacy accounting, norm
quantiles.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from fl_clip21 import kernels, streams

# The values of the scenario key ``device``: numpy, or torch on the CPU or the (first) CUDA GPU.
DEVICES = ("numpy", "cpu", "cuda")


class Numpy:
    """numpy arrays in host memory: the default, and what the Flower engine always uses."""

    name = "numpy"

    def asarray(self, a: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def cast(self, a: np.ndarray, dtype: Any) -> np.ndarray:
        """``a`` in ``dtype``, itself when it already is."""
        return a.astype(dtype, copy=False)

    def copy(self, a: np.ndarray) -> np.ndarray:
        return a.copy()

    def stack(self, arrays: list[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.stack(arrays, axis=axis)

    def concatenate(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

    def broadcast_copy(self, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A new array of ``shape`` holding ``a`` broadcast (a model copied to every row)."""
        return np.array(np.broadcast_to(a, shape), copy=True)

    def where(self, cond: np.ndarray, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    def multiply(self, a: Any, b: Any, out: np.ndarray | None = None) -> np.ndarray:
        return np.multiply(a, b, out=out)

    def subtract(self, a: Any, b: Any, out: np.ndarray | None = None) -> np.ndarray:
        return np.subtract(a, b, out=out)

    def add(self, a: Any, b: Any, out: np.ndarray | None = None) -> np.ndarray:
        return np.add(a, b, out=out)

    def einsum(self, spec: str, *operands: np.ndarray) -> np.ndarray:
        return np.einsum(spec, *operands)

    def block_rows(self, a: np.ndarray) -> int:
        """Rows of ``a`` (m, d) per block of a row-wise pass: about 512 KiB of float64, at least one row."""
        return max(1, 65536 // max(1, a.shape[-1]))

    def sum_rows(self, a: np.ndarray) -> np.ndarray:
        """The sum of the rows of ``a`` (m, d), in float64.

        float64 rows are summed by BLAS (a product with ones): numpy's
        reduction over axis 0 walks the rows one at a time, 3x slower at d = 31.
        """
        if a.dtype == np.float64 and a.ndim == 2:
            return np.ones(a.shape[0]) @ a
        return a.sum(axis=0, dtype=np.float64)

    def mean(self, a: np.ndarray) -> float:
        """The mean of every entry, in float64, as a float."""
        return float(np.mean(a, dtype=np.float64))

    def fraction(self, mask: np.ndarray, axis: int | None = None) -> Any:
        """The share of True entries of ``mask`` (along ``axis``), in float64."""
        return np.mean(mask, axis=axis)

    def count_nonzero_rows(self, a: np.ndarray) -> np.ndarray:
        return np.count_nonzero(a, axis=1)

    def exp(self, a: np.ndarray) -> np.ndarray:
        return np.exp(a)

    def logistic(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(log(1 + exp(-m)), 1 / (1 + exp(m)))`` without overflow, both from one ``exp(-|m|)``.

        ``log(1 + exp(-m)) = max(-m, 0) + log1p(exp(-|m|))`` and the sigmoid is
        ``exp(-(max(m, 0) + log1p(exp(-|m|))))``: numpy's vectorised exp and
        log1p, where ``np.logaddexp(0, -m)`` calls libm's one entry at a time (7x slower).
        """
        tail = np.log1p(np.exp(-np.abs(m)))
        loss = np.maximum(-m, 0.0)
        loss += tail
        weight = np.maximum(m, 0.0)
        weight += tail
        return loss, np.exp(np.negative(weight, out=weight), out=weight)

    def row_norms(self, Y: np.ndarray) -> np.ndarray:
        """The L2 norm of every row of ``Y`` (..., d), in float64, without overflow or underflow."""
        Y = np.asarray(Y)
        flat = Y.reshape(int(np.prod(Y.shape[:-1])), Y.shape[-1]) if Y.ndim > 1 else Y[None, :]
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            sq = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
        # Two reductions decide the common case (every square finite and normal: a NaN fails both).
        bad = None if sq.size and sq.min() > 1e-280 and sq.max() < math.inf else ~((sq > 1e-280) & (sq < math.inf))
        if bad is not None and bad.any():  # rescale the rows whose squares overflow or underflow
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

    def top_indices(self, Y: np.ndarray, k: int) -> np.ndarray:
        """(m, k): the columns of the k entries of largest magnitude of every row (ties: introselect's)."""
        d = Y.shape[1]
        return np.argpartition(np.abs(Y), d - k, axis=1)[:, d - k :]

    def keep_entries(self, Y: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """A new array, zero but for ``Y``'s entries at columns ``keep`` (m, k) of each row."""
        rows = np.arange(Y.shape[0])[:, None]
        out = np.zeros_like(Y)
        out[rows, keep] = Y[rows, keep]
        return out

    def segment_means(self, values: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The mean of each run of ``sizes[j]`` consecutive rows of ``values`` starting at ``starts[j]``."""
        out = np.add.reduceat(values, starts, axis=0)
        return out / (sizes if values.ndim == 1 else sizes[:, None])

    def weighted_row_sums(self, X: np.ndarray, values: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(m, d): for each j < m, the sum over its ``counts[j]`` entries r (consecutive) of values[r] X[rows[r]].

        One CSR (sparse-times-dense) product that reads X's rows in place: no
        copy of the data, no (rows x d) temporary.
        """
        return self.row_sums(rows, counts, X.shape[0])(values, X)

    def row_sums(
        self, rows: np.ndarray, counts: np.ndarray, num_rows: int
    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """:meth:`weighted_row_sums` for a fixed ``(rows, counts)``: ``sums(values, X)``, built once, called often.

        ``sums(values, X, with_total=True)`` returns the sum of the (m, d)
        result's rows too (float64), as ``(result, total)``.

        The CSR structure (indices, offsets) is checked once here; a call only
        puts this round's weights into a shallow copy of the matrix (no shared
        state written, no format check, no copy of the structure). Where numba
        is installed the product is a compiled loop with scipy's sums in
        scipy's order (fl_clip21.kernels), bit for bit the same.
        """
        from scipy.sparse import csr_array

        indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        if indptr[-1] != rows.size:
            raise ValueError(f"row_sums: counts add up to {indptr[-1]}, but {rows.size} rows were given")
        if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
            raise ValueError(f"row_sums: rows must lie in [0, {num_rows}), got {rows.min()}..{rows.max()}")
        matrix = csr_array((np.zeros(len(rows)), rows, indptr), shape=(len(counts), num_rows))

        def sums(values: np.ndarray, X: np.ndarray, with_total: bool = False):
            if (kernels.usable(X) and X.dtype == np.float64 and values.dtype == np.float64
                    and values.shape == rows.shape and X.shape[0] >= num_rows):
                return kernels.row_sums(np.ascontiguousarray(values), X, rows, indptr, with_total)
            product = copy.copy(matrix)
            product.data = values
            out = np.asarray(product @ X)
            return (out, self.sum_rows(out)) if with_total else out

        return sums

    def normals(self, seed: int, purpose: int, clients: np.ndarray, server_round: int, count: int,
                step: int = 0) -> np.ndarray:
        """:func:`fl_clip21.streams.normals`."""
        return streams.normals(seed, purpose, clients, server_round, count, step)

    def synchronize(self) -> None:
        """Wait for the device's queued work (nothing to wait for on numpy)."""


class Torch:
    """torch tensors on ``device`` (``cpu`` or ``cuda``), float64 where numpy is (float32 for the MLP)."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = device

    def _dtype(self, dtype: Any):
        if dtype is None or isinstance(dtype, self.torch.dtype):
            return dtype
        return self.torch.from_numpy(np.empty(0, dtype=dtype)).dtype

    def asarray(self, a: Any, dtype: Any = None):
        if isinstance(a, self.torch.Tensor):
            return a.to(device=self.device, dtype=self._dtype(dtype) or a.dtype)
        a = np.asarray(a)
        return self.torch.as_tensor(a if a.flags.writeable else a.copy(), dtype=self._dtype(dtype), device=self.device)

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy() if isinstance(a, self.torch.Tensor) else np.asarray(a)

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = np.float64):
        return self.torch.zeros(shape, dtype=self._dtype(dtype), device=self.device)

    def cast(self, a, dtype: Any):
        return a.to(self._dtype(dtype))

    def copy(self, a):
        return a.clone()

    def stack(self, arrays: list, axis: int = 0):
        return self.torch.stack(arrays, dim=axis)

    def concatenate(self, arrays: list):
        return self.torch.cat(arrays)

    def broadcast_copy(self, a, shape: tuple[int, ...]):
        return a.expand(shape).clone(memory_format=self.torch.contiguous_format)

    def where(self, cond, a: Any, b: Any):
        return self.torch.where(cond, a, b)

    def multiply(self, a: Any, b: Any, out=None):
        return self.torch.mul(a, b, out=out)

    def subtract(self, a: Any, b: Any, out=None):
        return self.torch.sub(a, b, out=out)

    def add(self, a: Any, b: Any, out=None):
        return self.torch.add(a, b, out=out)

    def einsum(self, spec: str, *operands):
        return self.torch.einsum(spec, *operands)

    def block_rows(self, a) -> int:
        """All rows in one block: a device runs each pass as one kernel."""
        return max(1, a.shape[0])

    def sum_rows(self, a):
        return a.sum(dim=0, dtype=self.torch.float64)

    def mean(self, a) -> float:
        return float(a.to(self.torch.float64).mean())

    def fraction(self, mask, axis: int | None = None):
        return mask.to(self.torch.float64).mean() if axis is None else mask.to(self.torch.float64).mean(dim=axis)

    def count_nonzero_rows(self, a):
        return self.torch.count_nonzero(a, dim=1)

    def exp(self, a):
        return self.torch.exp(a)

    def logistic(self, m):
        """:meth:`Numpy.logistic` in torch."""
        tail = self.torch.log1p(self.torch.exp(-m.abs()))
        return (-m).clamp(min=0) + tail, self.torch.exp(-(m.clamp(min=0) + tail))

    def row_norms(self, Y):
        """:meth:`Numpy.row_norms` in torch: in float64, the rows whose squares' sum left the range rescaled."""
        torch = self.torch
        flat = Y.reshape(-1, Y.shape[-1]) if Y.ndim > 1 else Y[None, :]
        out = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)
        bad = ~((out > 1e-140) & (out < math.inf))  # the squares' sum overflowed or underflowed
        if bool(bad.any()):
            rows = flat[bad].to(torch.float64)
            peak = rows.abs().amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
            fine = (peak > 0) & torch.isfinite(peak)
            safe = torch.where(fine, peak, torch.ones_like(peak))
            scaled = peak * torch.linalg.vector_norm(rows / safe[:, None], dim=1)
            out[bad] = torch.where(fine, scaled, peak)
        return out.reshape(Y.shape[:-1]) if Y.ndim > 1 else out[0]

    def top_indices(self, Y, k: int):
        """(m, k) columns of the k largest magnitudes per row (ties may fall otherwise than numpy's)."""
        return self.torch.topk(Y.abs(), k, dim=1, sorted=False).indices

    def keep_entries(self, Y, keep):
        return self.torch.zeros_like(Y).scatter_(1, keep, Y.gather(1, keep))

    def _owners(self, sizes: np.ndarray):
        return self.torch.repeat_interleave(
            self.torch.arange(len(sizes), device=self.device), self.asarray(np.asarray(sizes, dtype=np.int64))
        )

    def segment_means(self, values, starts: np.ndarray, sizes: np.ndarray):
        sums = values.new_zeros((len(sizes), *values.shape[1:])).index_add_(0, self._owners(sizes), values)
        counts = self.asarray(np.asarray(sizes, dtype=np.float64))
        return sums / (counts if values.ndim == 1 else counts[:, None])

    def weighted_row_sums(self, X, values, rows, counts: np.ndarray):
        """:meth:`Numpy.weighted_row_sums` with torch's sparse CSR product (cuSPARSE on a GPU)."""
        import warnings

        indptr = self.asarray(np.concatenate(([0], np.cumsum(counts))).astype(np.int64))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            matrix = self.torch.sparse_csr_tensor(
                indptr, self.asarray(rows), values, size=(len(counts), X.shape[0]), check_invariants=False
            )
            return matrix @ X

    def row_sums(self, rows: np.ndarray, counts: np.ndarray, num_rows: int):
        """:meth:`Numpy.row_sums` with torch's sparse CSR product: the indices copied to the device once."""
        import warnings

        indptr = self.asarray(np.concatenate(([0], np.cumsum(counts))).astype(np.int64))
        indices = self.asarray(np.asarray(rows, dtype=np.int64))
        size = (len(counts), num_rows)

        def sums(values, X, with_total: bool = False):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                matrix = self.torch.sparse_csr_tensor(indptr, indices, values, size=size, check_invariants=False)
                out = matrix @ X
            return (out, self.sum_rows(out)) if with_total else out

        return sums

    def normals(self, seed: int, purpose: int, clients: np.ndarray, server_round: int, count: int, step: int = 0):
        """:func:`fl_clip21.streams.normals_torch` on this device."""
        return streams.normals_torch(seed, purpose, clients, server_round, count, step, device=self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


NUMPY = Numpy()
Backend = Numpy | Torch
_TORCH: dict[str, Torch] = {}


def get(device: str = "numpy") -> Backend:
    """The backend of the scenario key ``device`` (numpy, cpu or cuda)."""
    if device == "numpy":
        return NUMPY
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device not in _TORCH:
        _TORCH[device] = Torch(device)
    return _TORCH[device]


def is_tensor(a: Any) -> bool:
    """Whether ``a`` is a torch tensor (without importing torch where nothing did)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def of(a: Any) -> Backend:
    """The backend ``a`` lives on: torch on its device for a tensor, else numpy."""
    return get(a.device.type) if is_tensor(a) else NUMPY


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU here, or None when it can."""
    try:
        import torch
    except ImportError as e:
        return f"torch cannot be imported ({e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)"
    return None
