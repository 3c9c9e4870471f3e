"""Decoding of what clients send, trusting nothing.

Clients are untrusted by definition. Every field of a reply is decoded here
before the strategy looks at it: an Array's payload is parsed from its own
bytes (numpy serialisation only, no pickle) and checked against its header and
against the model's layout (shape, dtype, byte length); integers must be
integers; a sparse (Top-k) message must carry exactly k distinct in-range
indices; values must be finite and the message's global norm within the
algorithm's bound. Anything else raises :class:`ReplyError` with the reason,
which the strategy counts as a rejection, never as a crash.

Nothing here changes any state: a rejected reply leaves the server as it was.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fl_clip21 import core
from fl_clip21.core import Params
from fl_clip21.flower import records as R

NORM_SLACK = 1e-6  # a message may exceed the bound by this relative amount (float rounding)
NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
_MAX_HEADER = 10_000  # bytes of a .npy header numpy itself accepts without allow_pickle tricks


class ReplyError(ValueError):
    """A reply, or a part of it, that the server must not use (the reason is the message)."""


class NotClip21Reply(ReplyError):
    """A reply without what every fl-clip21 client sends: the app runs no Clip21 client (no ``clip21_mod``)."""


@dataclass(frozen=True)
class TrainReply:
    """A train reply that passed every check.

    Attributes
    ----------
    round:
        The round the client says it worked on (an int; compared by the caller).
    needs_resync:
        The client holds a memory the server does not mirror and did no work.
    message:
        The decoded message (c_i), in the model's layout; None with ``needs_resync``.
    clipped:
        Whether the client's operator was active.
    audit_start, audit_end:
        The memories the client started and ended the round with (audit only).
    norms:
        ``(||update||, ||operator input||)`` the client reported, or None.
    metrics:
        The app's own metrics: the items of the reply's one MetricRecord that
        is not fl-clip21's (:data:`~fl_clip21.flower.records.REPLY`), whatever
        its name, as FedAvg takes it, less any key under fl-clip21's prefix
        (those name the server's own round metrics). Values as sent:
        :mod:`fl_clip21.flower.metrics` checks them when aggregating.
    left_out:
        What of the app's metrics was left out and why (for the log), or None.
    """

    round: int
    needs_resync: bool
    message: Params | None
    clipped: bool
    audit_start: Params | None = None
    audit_end: Params | None = None
    norms: tuple[float, float] | None = None
    metrics: dict = field(default_factory=dict)
    left_out: str | None = None


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def strict_int(value: object, what: str) -> int:
    """``value`` if it is an int (not a bool, not a float such as 1.0 or 1.9), else :class:`ReplyError`."""
    if type(value) is not int:  # noqa: E721 - bool and numpy ints are refused on purpose
        raise ReplyError(f"{what} must be an integer, got {_describe(value)}")
    return value


def flag(value: object, what: str) -> bool:
    """An int 0 or 1 as a bool, else :class:`ReplyError`."""
    v = strict_int(value, what)
    if v not in (0, 1):
        raise ReplyError(f"{what} must be 0 or 1, got {v}")
    return bool(v)


def payload_bytes(record: object) -> int:
    """Bytes of array values a record really carries (each payload's length after its own .npy header).

    A payload whose header cannot be parsed counts with its whole length.
    """
    if not isinstance(record, ArrayRecord):
        return 0
    total = 0
    for arr in record.values():
        data = getattr(arr, "data", b"")
        if not isinstance(data, bytes):
            continue
        try:
            total += len(data) - _parse_npy(data)[3]
        except ReplyError:
            total += len(data)
    return total


def _parse_npy(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, offset of the values) from a .npy payload's own header."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
        else:
            raise ReplyError(f"payload has .npy format version {version}, expected 1.0 or 2.0")
    except ReplyError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, ... on garbage
        raise ReplyError(f"payload is not a .npy array ({type(e).__name__}: {e})") from None
    return tuple(shape), bool(fortran), np.dtype(dtype), f.tell()


def decode_array(arr: object, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    """The values of Flower ``Array`` ``arr``, checked to be a ``shape`` ``dtype`` array.

    The payload is parsed from its own bytes: the header fields of the Array
    (``shape``, ``dtype``), the .npy header inside the payload and the payload's
    length must all agree with the expected layout. Returns a new writable array.
    """
    if not isinstance(arr, Array):
        raise ReplyError(f"array {name!r} is a {type(arr).__name__}, not a Flower Array")
    if arr.stype != NUMPY_STYPE:
        raise ReplyError(f"array {name!r} has serialisation {_describe(arr.stype)}, expected {NUMPY_STYPE!r}")
    if not isinstance(arr.data, bytes):
        raise ReplyError(f"array {name!r} has a payload of type {type(arr.data).__name__}, expected bytes")
    try:
        header_dtype = np.dtype(arr.dtype)
    except Exception:  # noqa: BLE001 - TypeError, ValueError, SyntaxError for a garbage dtype string
        raise ReplyError(f"array {name!r} has dtype {_describe(arr.dtype)}, expected {dtype}") from None
    header_shape = arr.shape if isinstance(arr.shape, tuple) else None
    if header_shape != shape or header_dtype != dtype:
        raise ReplyError(
            f"array {name!r} says shape {_describe(arr.shape)} {arr.dtype}, expected {shape} {dtype}"
        )
    got_shape, fortran, got_dtype, offset = _parse_npy(arr.data)
    if got_shape != shape or got_dtype != dtype:
        raise ReplyError(
            f"array {name!r}: its header says {shape} {dtype} but its payload holds {got_shape} {got_dtype}"
        )
    count = int(np.prod(shape, dtype=np.int64))
    if len(arr.data) - offset != count * dtype.itemsize:
        raise ReplyError(
            f"array {name!r}: payload has {len(arr.data) - offset} bytes of values, "
            f"{shape} {dtype} needs {count * dtype.itemsize}"
        )
    flat = np.frombuffer(arr.data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def decode_arrays(record: object, layout: Mapping[str, np.ndarray], what: str = "message") -> Params:
    """A dense ArrayRecord decoded to exactly the keys, shapes and dtypes of ``layout``."""
    if not isinstance(record, ArrayRecord):
        raise ReplyError(f"{what}: no ArrayRecord, got {type(record).__name__}")
    keys = list(record.keys())
    if set(keys) != set(layout):
        raise ReplyError(f"{what}: array keys {sorted(map(str, keys))[:8]} differ from the model's {sorted(layout)[:8]}")
    try:
        return {k: decode_array(record[k], ref.shape, ref.dtype, k) for k, ref in layout.items()}
    except ReplyError as e:
        raise ReplyError(f"{what}: {e}") from None


def decode_sparse(record: object, layout: Mapping[str, np.ndarray], k: int) -> Params:
    """A sparse (Top-k) ArrayRecord: exactly ``k`` distinct indices in [0, d) and their values."""
    if not isinstance(record, ArrayRecord):
        raise ReplyError(f"sparse message: no ArrayRecord, got {type(record).__name__}")
    if set(record.keys()) != {R.SPARSE_INDICES, R.SPARSE_VALUES}:
        raise ReplyError(f"sparse message has keys {sorted(map(str, record.keys()))[:8]}, expected indices and values")
    d = int(sum(np.size(v) for v in layout.values()))
    dtype = np.result_type(*(v.dtype for v in layout.values()))
    idx = decode_array(record[R.SPARSE_INDICES], (k,), R.index_dtype(d), R.SPARSE_INDICES)
    val = decode_array(record[R.SPARSE_VALUES], (k,), dtype, R.SPARSE_VALUES)
    if k and (idx.min() < 0 or idx.max() >= d):
        raise ReplyError(f"sparse indices must be in [0, {d}), got range [{idx.min()}, {idx.max()}]")
    if np.unique(idx).size != k:
        raise ReplyError(f"sparse indices must be {k} distinct entries, got {np.unique(idx).size} distinct")
    flat = np.zeros(d, dtype=dtype)
    flat[idx] = val
    out, start = {}, 0
    for name, ref in layout.items():
        out[name] = flat[start : start + ref.size].reshape(ref.shape).astype(ref.dtype)
        start += ref.size
    return out


def check_values(arrays: Params, bound: float | None) -> None:
    """Every value finite and the global norm at most ``bound * (1 + NORM_SLACK)``."""
    for k, a in arrays.items():
        if not np.all(np.isfinite(a)):
            raise ReplyError(f"array {k!r} has non-finite values")
    if bound is not None:
        norm = core.global_norm(arrays)
        if not norm <= bound * (1 + NORM_SLACK):
            raise ReplyError(f"norm {norm:.6g} exceeds the bound {bound:.6g}")


def norm_value(value: object, what: str) -> float:
    """A finite number >= 0 (an int or a float), else :class:`ReplyError`."""
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ReplyError(f"{what} must be a finite number >= 0, got {_describe(value)}")
    return float(value)


def app_metrics(content: Mapping) -> tuple[dict, str | None]:
    """The app's metrics in a reply's ``content`` and what was left out of them (None: nothing).

    The app's record is the reply's MetricRecord that is not fl-clip21's
    (:data:`~fl_clip21.flower.records.REPLY`); several are left out whole, as
    FedAvg refuses them. A key under fl-clip21's prefix is left out: the
    server reports its own round metrics under those names.
    """
    records = {name: r for name, r in content.items() if isinstance(r, MetricRecord) and name != R.REPLY}
    if not records:
        return {}, None
    if len(records) > 1:
        return {}, f"{len(records)} MetricRecords {sorted(records)[:4]}, expected one"
    (record,) = records.values()
    own = sorted(k for k in record if k.startswith(R.PREFIX))
    kept = {k: v for k, v in record.items() if not k.startswith(R.PREFIX)}
    return kept, (f"keys {own[:8]} (the prefix {R.PREFIX!r} is the server's)" if own else None)


def _norms(metrics: MetricRecord) -> tuple[float, float] | None:
    if R.UPDATE_NORM not in metrics and R.INPUT_NORM not in metrics:
        return None
    if R.UPDATE_NORM not in metrics or R.INPUT_NORM not in metrics:
        raise ReplyError(f"the reply's metrics have one of {R.UPDATE_NORM!r} and {R.INPUT_NORM!r}, not both")
    return norm_value(metrics[R.UPDATE_NORM], R.UPDATE_NORM), norm_value(metrics[R.INPUT_NORM], R.INPUT_NORM)


def _memory(content, key: str, layout: Mapping[str, np.ndarray]) -> Params | None:
    record = content.get(key)
    if record is None:
        return None
    what = f"audit record {key!r}"
    arrays = decode_arrays(record, layout, what)
    try:
        check_values(arrays, None)
    except ReplyError as e:
        raise ReplyError(f"{what}: {e}") from None
    return arrays


def decode_train_reply(
    content: object,
    layout: Mapping[str, np.ndarray],
    bound: float | None,
    sparse_k: int | None = None,
    audit: bool = False,
) -> TrainReply:
    """Decode and check a train reply's content; :class:`ReplyError` says why it cannot be used.

    Parameters
    ----------
    content:
        The reply's RecordDict (anything: it came from a client).
    layout:
        The model: array names, shapes and dtypes a message must have.
    bound:
        Largest global norm a message may have (None: no bound).
    sparse_k:
        For sparse algorithms, the number of entries a message carries.
    audit:
        Decode the audit records too (their absence is not an error).
    """
    if not isinstance(content, Mapping):
        raise ReplyError(f"reply content is a {type(content).__name__}, not a RecordDict")
    metrics = content.get(R.REPLY)
    if not isinstance(metrics, MetricRecord):
        raise NotClip21Reply(
            f"no {R.REPLY!r} MetricRecord in the reply: the ClientApp's train handler must run "
            "fl_clip21.flower.mod.clip21_mod (app.train(mods=[clip21_mod])), of this version of fl-clip21"
        )
    if R.ROUND not in metrics:
        raise NotClip21Reply(
            f"the reply's {R.REPLY!r} record has no {R.ROUND!r} round tag: the ClientApp's train handler must "
            "run fl_clip21.flower.mod.clip21_mod (app.train(mods=[clip21_mod])), of this version of fl-clip21"
        )
    round_ = strict_int(metrics[R.ROUND], f"round tag {R.ROUND!r}")
    start = _memory(content, R.AUDIT_START, layout) if audit else None
    if R.NEEDS_RESYNC in metrics and flag(metrics[R.NEEDS_RESYNC], R.NEEDS_RESYNC):
        return TrainReply(round_, True, None, False, start)
    clipped = flag(metrics.get(R.CLIPPED, 0), repr(R.CLIPPED))
    norms = _norms(metrics)
    record = content.get(R.ARRAYS)
    if sparse_k is None:
        message = decode_arrays(record, layout)
    else:
        message = decode_sparse(record, layout, sparse_k)
    check_values(message, bound)
    end = _memory(content, R.AUDIT_END, layout) if audit else None
    kept, left_out = app_metrics(content)
    return TrainReply(round_, False, message, clipped, start, end, norms, kept, left_out)


def decode_handshake(content: object, num_clients: int) -> int:
    """The partition-id a node's handshake reply claims, checked against ``num_clients``."""
    config = content.get(R.CONFIG) if isinstance(content, Mapping) else None
    if not isinstance(config, ConfigRecord):
        raise ReplyError(f"handshake reply has no {R.CONFIG!r} ConfigRecord")
    if R.PARTITION_ID not in config:
        raise ReplyError(f"handshake reply has no {R.PARTITION_ID!r}")
    i = strict_int(config[R.PARTITION_ID], R.PARTITION_ID)
    n = strict_int(config.get(R.NUM_PARTITIONS, -1), R.NUM_PARTITIONS)
    if n not in (-1, num_clients):
        raise ReplyError(f"{R.NUM_PARTITIONS}={n}, but num-clients={num_clients}")
    if not 0 <= i < num_clients:
        raise ReplyError(f"{R.PARTITION_ID}={i} is outside 0..{num_clients - 1}")
    return i
