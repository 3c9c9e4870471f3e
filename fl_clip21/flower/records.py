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
METRICS = "metrics"  # an app's metrics (Flower's convention); fl-clip21's own reply fields are in REPLY
# client -> server: the consistency protocol's fields of a train reply (the keys below), in a MetricRecord
# of their own, so that an app's metrics may use any name (and the app's record any name, as FedAvg allows)
REPLY = "fl_clip21.reply"
# client -> server, only when auditing: the memory the client started the round from / ends it with
AUDIT_START = "fl_clip21.audit.start"
AUDIT_END = "fl_clip21.audit.end"
RESYNC = "fl_clip21.resync"  # server -> client: the server's copy of the client's memory
PREFIX = "fl_clip21."  # of fl-clip21's own keys in the records it shares with an app's
# Keys inside the ConfigRecord sent with each train message.
ROUND = "server-round"
ALGORITHM = "fl_clip21.algorithm"
SCENARIO = "fl_clip21.scenario"
DO_AUDIT = "fl_clip21.audit"
SESSION = "fl_clip21.session"  # id of the strategy instance (run x algorithm); scopes client state
TAU = "fl_clip21.tau"  # for clip21_mod: the clipping threshold
ACK = "fl_clip21.ack"  # the last round whose increment of this client the server applied
# In the REPLY record: ROUND (the round the client worked on), and
NEEDS_RESYNC = "needs-resync"  # this client's memory is not the one the server mirrors
CLIPPED = "clipped"  # 1 if the client's operator was active
# and, for noise-free algorithms, ||update|| and ||operator input|| (what tau is chosen from).
UPDATE_NORM = "fl_clip21.update-norm"
INPUT_NORM = "fl_clip21.input-norm"
# Node config keys of a client's partition (the handshake reply carries them back).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
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


# A sparse message (Top-k) travels as flat indices into the model (its arrays
# in key order, each flattened) and the values there.
SPARSE_INDICES = "fl_clip21.sparse.indices"
SPARSE_VALUES = "fl_clip21.sparse.values"


def index_dtype(d: int) -> np.dtype:
    """The integer type of a sparse message's indices into a model of ``d`` entries."""
    return np.dtype(np.int32 if d < 2**31 else np.int64)


def encode_sparse(params: Mapping[str, np.ndarray], k: int) -> ArrayRecord:
    """Array dict with at most ``k`` non-zero entries -> ArrayRecord of exactly ``k`` (index, value) pairs.

    The non-zero entries, and, when there are fewer than ``k``, zero-valued
    entries at the lowest other indices: the server checks that a message
    carries exactly ``k`` distinct indices.
    """
    flat = np.concatenate([np.ravel(v) for v in params.values()])
    nonzero = np.flatnonzero(flat)
    if nonzero.size > k:
        raise ValueError(f"a sparse message may carry k={k} entries, this one has {nonzero.size} non-zero entries")
    if nonzero.size < k:
        mask = np.zeros(flat.size, dtype=bool)
        mask[nonzero] = True
        nonzero = np.sort(np.concatenate([nonzero, np.flatnonzero(~mask)[: k - nonzero.size]]))
    return ArrayRecord(
        {SPARSE_INDICES: Array(nonzero.astype(index_dtype(flat.size))), SPARSE_VALUES: Array(np.ascontiguousarray(flat[nonzero]))}
    )
