"""A model's layout: flattening named arrays into one vector, and back, once at the edges.

Inside every engine a model, a client's memory or a message is one flat
vector of d entries (a batch of them is an (m, d) array); the names, shapes
and dtypes of the model's arrays are kept here for the wire (Flower
ArrayRecords), for torch modules and for the outputs. Flattening follows
the arrays' key order, so a flat index means the same entry everywhere
(Top-k's indices on the wire are such indices).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fl_clip21.core import Params


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a model's arrays, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, params: Mapping[str, np.ndarray]) -> Layout:
        """The layout of ``params`` (its key order)."""
        return cls(
            tuple(params), tuple(tuple(np.shape(v)) for v in params.values()),
            tuple(np.asarray(v).dtype for v in params.values()),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def size(self) -> int:
        """d: the number of entries of the whole model."""
        return sum(self.sizes)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the flat vector: the arrays' common type."""
        return np.result_type(*self.dtypes) if self.dtypes else np.dtype(np.float64)

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """One (d,) vector of ``params``' entries, in this layout's order (a new array)."""
        if set(params) != set(self.names):
            raise ValueError(f"arrays {sorted(params)} are not the model's {sorted(self.names)}")
        out = np.empty(self.size, dtype=self.dtype)
        start = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            arr = np.asarray(params[name])
            if arr.shape != shape:
                raise ValueError(f"array {name!r} has shape {arr.shape}, the model's is {shape}")
            out[start : start + size] = arr.ravel()
            start += size
        return out

    def flatten_rows(self, rows: list[Mapping[str, np.ndarray]]) -> np.ndarray:
        """An (m, d) array of the flattened ``rows``."""
        out = np.empty((len(rows), self.size), dtype=self.dtype)
        for i, params in enumerate(rows):
            out[i] = self.flatten(params)
        return out

    def unflatten(self, flat: np.ndarray) -> Params:
        """The named arrays of a (d,) vector, each in its own dtype (new arrays)."""
        flat = np.asarray(flat)
        if flat.shape != (self.size,):
            raise ValueError(f"a flat model of this layout has shape ({self.size},), got {flat.shape}")
        out, start = {}, 0
        for name, shape, size, dtype in zip(self.names, self.shapes, self.sizes, self.dtypes):
            out[name] = flat[start : start + size].reshape(shape).astype(dtype, copy=True)
            start += size
        return out

    def zeros(self, rows: int | None = None) -> np.ndarray:
        """A zero (d,) vector, or (rows, d) array."""
        return np.zeros(self.size if rows is None else (rows, self.size), dtype=self.dtype)
