"""Conversions between numpy array dicts and Flower records; wire keys."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from fl_clip21.core import Params

# Keys of the records in a message's RecordDict.
ARRAYS = "arrays"  # server -> client: the model x; client -> server: the message c_i
CONFIG = "config"
METRICS = "metrics"
AUDIT = "fl_clip21.audit"  # client -> server, only when auditing: the client's v_i
# Keys inside the ConfigRecord sent with each train message.
ROUND = "server-round"
ALGORITHM = "fl_clip21.algorithm"
SCENARIO = "fl_clip21.scenario"
DO_AUDIT = "fl_clip21.audit"
# Client state (context.state) record names.
STATE_PREFIX = "fl_clip21.state."


def to_record(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Array dict -> ArrayRecord (keeps names, shapes and dtypes)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})


def from_record(record: ArrayRecord) -> Params:
    """ArrayRecord -> array dict."""
    return {k: v.numpy() for k, v in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array values a record carries (what the arrays hold, headers excluded)."""
    total = 0
    for arr in record.values():
        total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return total
