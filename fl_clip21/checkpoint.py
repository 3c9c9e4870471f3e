"""Atomic, verified checkpoints of a run's server side: arrays in .npz, the rest as JSON.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over the old one: a crash leaves either the old or the new
checkpoint, never half of one.

The metadata (the member ``__meta__.json``) records, under :data:`ARRAYS`,
every array's dtype, shape and the sha256 of its bytes; :func:`load` checks
them and that the run's state is finite, and raises :class:`CheckpointError`,
naming the file, the part and what is wrong, for a checkpoint that is not
what :func:`save` wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_clip21.core import Params

META = "__meta__.json"
ARRAYS = "__arrays__"  # the key of the arrays' record in the metadata
_NUMERIC = "biufc"  # dtype kinds a run's state may have: bool, int, uint, float, complex


class CheckpointError(ValueError):
    """A checkpoint is corrupted, truncated, incomplete, not finite, or of another configuration."""


def _flatten(groups: dict[str, Params]) -> dict[str, np.ndarray]:
    return {f"{g}/{k}": v for g, params in groups.items() for k, v in params.items()}


def _unflatten(arrays: dict[str, np.ndarray]) -> dict[str, Params]:
    groups: dict[str, Params] = {}
    for name, v in arrays.items():
        g, _, k = name.partition("/")
        groups.setdefault(g, {})[k] = v
    return groups


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array)).hexdigest()


def save(path: Path, arrays: dict[str, Params], meta: dict[str, Any]) -> None:
    """Write groups of arrays and JSON metadata to ``path`` atomically.

    The metadata written also records every array's dtype, shape and sha256
    under :data:`ARRAYS` (a key ``meta`` may not use); :func:`load` returns
    ``meta`` without it.
    """
    path = Path(path)
    if ARRAYS in meta:
        raise ValueError(f"meta may not have the key {ARRAYS!r}: the checkpoint records its arrays there")
    flat = {k: np.asarray(v) for k, v in _flatten(arrays).items()}
    record = {k: {"dtype": v.dtype.str, "shape": list(v.shape), "sha256": _sha256(v)} for k, v in flat.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    text = json.dumps({**meta, ARRAYS: record}).encode()
    np.savez(buf, **flat, **{META: np.frombuffer(text, dtype=np.uint8)})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, *, finite: bool = True) -> tuple[dict[str, Params], dict[str, Any]]:
    """Read what :func:`save` wrote: ``(array groups, metadata)``, verified.

    Parameters
    ----------
    path:
        The checkpoint (``.npz``).
    finite:
        Refuse an array of floats (or complex numbers) holding NaN or inf: the
        state of a run must be finite. ``False`` loads it anyway, to look at.

    Raises
    ------
    FileNotFoundError
        There is no file at ``path``.
    CheckpointError
        The file is not a zip or a member is corrupted or truncated, the
        metadata is missing or not a JSON object, an array is missing from the
        file or from the metadata's record, differs from its record (dtype,
        shape, sha256), is not numeric (an object array would need pickle,
        which is never allowed) or, with ``finite``, holds NaN or inf.

    A checkpoint written before the record of its arrays (no :data:`ARRAYS`
    in its metadata) still loads: its arrays are checked for being numeric
    and finite only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    where = f"checkpoint {str(path)!r}"
    try:
        data = np.load(path, allow_pickle=False)
    # zipfile and numpy raise BadZipFile, OSError, EOFError, ValueError, NotImplementedError and
    # RuntimeError (a flipped 'encrypted' flag) on a corrupted file: every one is this file's fault.
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where} cannot be opened as .npz: {type(e).__name__}: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{where} is a single .npy array, not an .npz of a run's state")
    with data:
        meta = _meta(data, where)
        record = meta.pop(ARRAYS, None)
        arrays = {k: _member(data, k, where) for k in data.files if k != META}
    for name, v in arrays.items():
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"{where}: member {name!r} is not a .npy array")
        if v.dtype.kind not in _NUMERIC:
            raise CheckpointError(f"{where}: array {name!r} has dtype {v.dtype}; a run's state is numeric")
    if record is not None:
        _check_record(record, arrays, where)
    for name, v in arrays.items():
        if finite and v.dtype.kind in "fc" and not np.isfinite(v).all():
            bad = int(v.size - np.count_nonzero(np.isfinite(v)))
            raise CheckpointError(
                f"{where}: array {name!r} holds {bad} non-finite values (NaN or inf) of {v.size}; the state "
                f"of a run must be finite (load(..., finite=False) reads it anyway)"
            )
    return _unflatten(arrays), meta


def _member(data: np.lib.npyio.NpzFile, name: str, where: str) -> Any:
    """Member ``name`` of the open ``data``, any failure to read it as a CheckpointError."""
    try:
        return data[name]
    except Exception as e:  # noqa: BLE001 - as in load: those types, each a corrupted member
        raise CheckpointError(f"{where}: member {name!r} cannot be read: {type(e).__name__}: {e}") from e


def _meta(data: np.lib.npyio.NpzFile, where: str) -> dict[str, Any]:
    if META not in data.files:
        raise CheckpointError(f"{where} has no member {META!r} (the run's metadata)")
    raw = _member(data, META, where)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise CheckpointError(f"{where}: member {META!r} is not the bytes of a JSON text")
    try:
        meta = json.loads(raw.tobytes().decode())
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise CheckpointError(f"{where}: member {META!r} is not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: member {META!r} is a JSON {type(meta).__name__}, not an object")
    return meta


def _check_record(record: Any, arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Every array in ``arrays`` is the one the metadata's ``record`` describes, and no other."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: the metadata's record of the arrays ({ARRAYS!r}) is not an object")
    if missing := sorted(record.keys() - arrays.keys()):
        raise CheckpointError(f"{where}: arrays {missing} of the metadata's record are missing from the file")
    if extra := sorted(arrays.keys() - record.keys()):
        raise CheckpointError(f"{where}: members {extra} are not in the metadata's record of the arrays")
    for name, v in arrays.items():
        want = record[name]
        if not isinstance(want, dict) or want.keys() != {"dtype", "shape", "sha256"}:
            raise CheckpointError(f"{where}: the metadata's record of array {name!r} is malformed: {want!r}")
        got = {"dtype": v.dtype.str, "shape": list(v.shape)}
        for key, value in got.items():
            if want[key] != value:
                raise CheckpointError(f"{where}: array {name!r} has {key} {value}, its record says {want[key]}")
        if (digest := _sha256(v)) != want["sha256"]:
            raise CheckpointError(
                f"{where}: array {name!r}: sha256 mismatch (recorded {want['sha256']}, computed {digest})"
            )


def compare_config(saved: Mapping[str, Any], current: Mapping[str, Any], what: str) -> None:
    """Refuse to go on from ``what`` (e.g. a checkpoint) made with another configuration.

    Nested mappings are compared key by key (``problem.dim``); a key on one
    side only is a difference; lists and tuples of equal items are equal (a
    configuration read back from JSON has lists); ``True`` differs from ``1``.

    Raises
    ------
    CheckpointError
        Naming the first differing key and both values:
        ``checkpoint '/x/run-0/clip21-gd.npz' was made with tau=0.1, this run has tau=0.2``.
    """
    found = _difference(saved, current, "")
    if found is not None:
        key, a, b = found
        made = f"with {key}={a!r}" if a is not _ABSENT else f"without {key}"
        has = f"has {key}={b!r}" if b is not _ABSENT else f"has no {key}"
        raise CheckpointError(f"{what} was made {made}, this run {has}")


_ABSENT = object()  # a key missing on one side of compare_config


def _difference(a: Any, b: Any, key: str) -> tuple[str, Any, Any] | None:
    """The first ``(key, a's value, b's value)`` at which ``a`` and ``b`` differ, or ``None``."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in [*a, *(k for k in b if k not in a)]:
            sub = f"{key}.{k}" if key else str(k)
            found = _difference(a.get(k, _ABSENT), b.get(k, _ABSENT), sub)
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        same = len(a) == len(b) and all(_difference(x, y, key) is None for x, y in zip(a, b))
        return None if same else (key, a, b)
    if isinstance(a, bool) != isinstance(b, bool) or a != b:
        return (key, a, b)
    return None
