"""Conversions between numpy array dicts and Flower records; wire keys."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_clip21.core import Params

# Keys of the records in a message's RecordDict.
ARRAYS = "arrays"  # server -> client: the model x; client -> server: the message c_i
CONFIG = "config"
METRICS = "metrics"
# client -> server, only when auditing: the memory the client started the round from / ends it with
AUDIT_START = "fl_clip21.audit.start"
AUDIT_END = "fl_clip21.audit.end"
RESYNC = "fl_clip21.resync"  # server -> client: the server's copy of the client's memory
# Keys inside the ConfigRecord sent with each train message.
ROUND = "server-round"
ALGORITHM = "fl_clip21.algorithm"
SCENARIO = "fl_clip21.scenario"
DO_AUDIT = "fl_clip21.audit"
SESSION = "fl_clip21.session"  # id of the strategy instance (run x algorithm); scopes client state
TAU = "fl_clip21.tau"  # for clip21_mod: the clipping threshold
ACK = "fl_clip21.ack"  # the last round whose increment of this client the server applied
NEEDS_RESYNC = "needs-resync"  # reply metric: this client's memory is not the one the server mirrors
# Client state (context.state) record names.
STATE_PREFIX = "fl_clip21.state."


@contextlib.contextmanager
def quiet_flower():
    """Silence Flower's log below ERROR (its notices on constructing strategies)."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def get_record(content, key: str, kind: type):
    """``content[key]`` if it is a record of type ``kind``, else None.

    A direct lookup: ``RecordDict.array_records`` and its kin build a new
    filtered dict on every access, a cost paid per message.
    """
    record = content.get(key)
    return record if isinstance(record, kind) else None


def to_record(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Array dict -> ArrayRecord (keeps names, shapes and dtypes)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})


def from_record(record: ArrayRecord) -> Params:
    """ArrayRecord -> array dict."""
    return {k: v.numpy() for k, v in record.items()}


def pack(params: Mapping[str, np.ndarray], **extra: int) -> ConfigRecord:
    """Array dict -> ConfigRecord of each array's raw bytes (and ``extra`` ints).

    The compact form of client state: no per-array header to write or parse;
    :func:`unpack` takes the names, shapes and dtypes from the model.
    """
    record = ConfigRecord({k: np.ascontiguousarray(v).tobytes() for k, v in params.items()})
    for k, v in extra.items():
        record[k] = v
    return record


def unpack(record: ConfigRecord, layout: Mapping[str, np.ndarray]) -> Params:
    """Inverse of :func:`pack`, with the names, shapes and dtypes of ``layout`` (read-only views, no copy)."""
    out = {}
    for k, ref in layout.items():
        raw = record[k]
        if not isinstance(raw, bytes) or len(raw) != ref.nbytes:
            raise ValueError(f"client state {k!r} holds {len(raw) if isinstance(raw, bytes) else type(raw).__name__} "
                             f"bytes, the model's {k!r} needs {ref.nbytes}")
        out[k] = np.frombuffer(raw, dtype=ref.dtype).reshape(ref.shape)
    return out


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array values a record carries (what the arrays hold, headers excluded)."""
    total = 0
    for arr in record.values():
        total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return total

# A sparse message (Top-k) travels as flat indices into the model (its arrays
# in key order, each flattened) and the values there.
SPARSE_INDICES = "fl_clip21.sparse.indices"
SPARSE_VALUES = "fl_clip21.sparse.values"


def encode_sparse(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Array dict -> ArrayRecord of (indices, values) of its non-zero entries."""
    flat = np.concatenate([np.ravel(v) for v in params.values()])
    idx = np.flatnonzero(flat)
    dtype = np.int32 if flat.size < 2**31 else np.int64
    return ArrayRecord(
        {SPARSE_INDICES: Array(idx.astype(dtype)), SPARSE_VALUES: Array(np.ascontiguousarray(flat[idx]))}
    )


def decode_sparse(
    record: ArrayRecord, reference: Mapping[str, np.ndarray]
) -> tuple[Params | None, str | None]:
    """Inverse of :func:`encode_sparse` with the model's layout; ``(None, reason)`` if malformed."""
    if set(record.keys()) != {SPARSE_INDICES, SPARSE_VALUES}:
        return None, f"sparse message has keys {sorted(record.keys())}, expected indices and values"
    idx, val = record[SPARSE_INDICES].numpy(), record[SPARSE_VALUES].numpy()
    d = int(sum(np.size(v) for v in reference.values()))
    if idx.ndim != 1 or val.shape != idx.shape or not np.issubdtype(idx.dtype, np.integer):
        return None, f"sparse message has indices {idx.shape} {idx.dtype} and values {val.shape}"
    if idx.size and (idx.min() < 0 or idx.max() >= d or np.unique(idx).size != idx.size):
        return None, f"sparse indices must be distinct and in [0, {d}), got range [{idx.min()}, {idx.max()}]"
    dtypes = {np.dtype(v.dtype) for v in reference.values()}
    if np.dtype(val.dtype) not in dtypes:
        return None, f"sparse values have dtype {val.dtype}, expected one of {sorted(map(str, dtypes))}"
    flat = np.zeros(d, dtype=np.float64)
    flat[idx] = val
    out, start = {}, 0
    for k, ref in reference.items():
        out[k] = flat[start : start + ref.size].reshape(ref.shape).astype(ref.dtype)
        start += ref.size
    return out, None
