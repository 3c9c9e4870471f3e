"""Decoding what clients send (fl_clip21.flower.validation): every hostile field is a ReplyError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fl_clip21.flower import records as R
from fl_clip21.flower import validation as V

LAYOUT = {"w": np.zeros(31)}


def _content(message=None, metrics=None, **extra) -> RecordDict:
    message = {"w": np.full(31, 0.01)} if message is None else message
    metrics = {R.ROUND: 1, "clipped": 0} if metrics is None else metrics
    content = RecordDict({R.ARRAYS: R.to_record(message) if isinstance(message, dict) else message,
                          R.REPLY: MetricRecord(metrics)})
    for k, v in extra.items():
        content[k] = v
    return content


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_a_valid_reply_decodes_to_the_message():
    got = V.decode_train_reply(_content(), LAYOUT, bound=0.1)
    assert got.round == 1 and not got.needs_resync and not got.clipped
    np.testing.assert_array_equal(got.message["w"], np.full(31, 0.01))
    assert got.message["w"].flags.writeable


@pytest.mark.parametrize("key", [R.ROUND, "clipped", R.NEEDS_RESYNC])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.9, 1.0, [1, 2], [0.5]])
def test_integer_fields_must_be_integers(key, value):
    with pytest.raises(V.ReplyError, match=f"{key}.* must be an integer"):
        V.decode_train_reply(_content(metrics={R.ROUND: 1, "clipped": 0, key: value}), LAYOUT, 0.1)


@pytest.mark.parametrize("key", ["clipped", R.NEEDS_RESYNC])
def test_flags_must_be_0_or_1(key):
    with pytest.raises(V.ReplyError, match="must be 0 or 1, got 2"):
        V.decode_train_reply(_content(metrics={R.ROUND: 1, "clipped": 0, key: 2}), LAYOUT, 0.1)


def test_a_round_tag_of_1_9_is_refused_not_truncated():
    with pytest.raises(V.ReplyError, match="must be an integer, got 1.9"):
        V.decode_train_reply(_content(metrics={R.ROUND: 1.9, "clipped": 0}), LAYOUT, 0.1)


def test_header_and_payload_must_agree():
    # The header says (31,) float64, the payload holds a (1,) array that numpy would broadcast.
    small = np.array([0.28])
    forged = ArrayRecord({"w": Array(dtype="float64", shape=(31,), stype=V.NUMPY_STYPE, data=_npy(small))})
    with pytest.raises(V.ReplyError, match=r"header says \(31,\) float64 but its payload holds \(1,\)"):
        V.decode_train_reply(_content(forged), LAYOUT, 0.1)


@pytest.mark.parametrize(
    "array, reason",
    [
        (Array(dtype="float64", shape=(31,), stype="torch.Tensor", data=_npy(np.zeros(31))), "serialisation"),
        (Array(dtype="float64", shape=(31,), stype=V.NUMPY_STYPE, data=b"\x00garbage" * 40), "not a .npy"),
        (Array(dtype="float64", shape=(31,), stype=V.NUMPY_STYPE, data=_npy(np.zeros(31))[:-8]), "bytes of values"),
        (Array(dtype="float64", shape=(31,), stype=V.NUMPY_STYPE, data=_npy(np.zeros(31)) + b"x" * 8), "bytes of values"),
        (Array(dtype="float32", shape=(31,), stype=V.NUMPY_STYPE, data=_npy(np.zeros(31, np.float32))), "float32"),
        (Array(dtype="no-such-type", shape=(31,), stype=V.NUMPY_STYPE, data=_npy(np.zeros(31))), "dtype"),
        (Array(dtype="float64", shape=(31,), stype=V.NUMPY_STYPE, data=_npy(np.zeros(31, ">f8"))), "payload holds"),
        (Array(dtype="float64", shape=(31, 1), stype=V.NUMPY_STYPE, data=_npy(np.zeros((31, 1)))), "says shape"),
    ],
)
def test_payloads_other_than_a_numpy_array_of_the_model_are_refused(array, reason):
    with pytest.raises(V.ReplyError, match=reason):
        V.decode_train_reply(_content(ArrayRecord({"w": array})), LAYOUT, 0.1)


def test_a_fortran_ordered_payload_is_read_in_its_order():
    layout = {"m": np.zeros((3, 2))}
    value = np.asfortranarray(np.arange(6.0).reshape(3, 2)) / 100
    got = V.decode_arrays(ArrayRecord({"m": Array(value)}), layout)
    np.testing.assert_array_equal(got["m"], value)


def test_pickled_payloads_are_never_loaded():
    obj = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    array = Array(dtype="float64", shape=(31,), stype=V.NUMPY_STYPE, data=buf.getvalue())
    with pytest.raises(V.ReplyError):
        V.decode_train_reply(_content(ArrayRecord({"w": array})), LAYOUT, 0.1)


def test_non_finite_and_oversized_messages_are_refused():
    with pytest.raises(V.ReplyError, match="non-finite"):
        V.decode_train_reply(_content({"w": np.full(31, np.nan)}), LAYOUT, 0.1)
    with pytest.raises(V.ReplyError, match="exceeds the bound"):
        V.decode_train_reply(_content({"w": np.full(31, 1e308)}), LAYOUT, 1e6)


def test_missing_records_and_wrong_record_types_are_refused():
    for content in (
        RecordDict({}),
        RecordDict({R.REPLY: ConfigRecord({R.ROUND: 1})}),
        RecordDict({R.REPLY: MetricRecord({"clipped": 0})}),
        RecordDict({R.METRICS: MetricRecord({R.ROUND: 1, "clipped": 0})}),  # the fields outside their record
        _content(ConfigRecord({"w": 1})),
        _content({"v": np.zeros(31)}),
    ):
        with pytest.raises(V.ReplyError):
            V.decode_train_reply(content, LAYOUT, 0.1)


def test_a_malformed_audit_record_is_refused():
    bad = ArrayRecord({"w": Array(np.zeros(3))})
    with pytest.raises(V.ReplyError, match="audit record"):
        V.decode_train_reply(_content(**{R.AUDIT_START: bad}), LAYOUT, 0.1, audit=True)
    with pytest.raises(V.ReplyError, match="audit record"):
        V.decode_train_reply(_content(**{R.AUDIT_END: R.to_record({"w": np.full(31, np.inf)})}), LAYOUT, 0.1, audit=True)


def _sparse(idx, val) -> ArrayRecord:
    return ArrayRecord({R.SPARSE_INDICES: Array(np.asarray(idx, dtype=np.int32)),
                        R.SPARSE_VALUES: Array(np.asarray(val, dtype=np.float64))})


def test_a_sparse_message_carries_exactly_k_distinct_in_range_indices():
    ok = V.decode_sparse(_sparse([0, 5, 30], [1.0, 2.0, 0.0]), LAYOUT, 3)
    assert ok["w"][5] == 2.0 and np.count_nonzero(ok["w"]) == 2
    for idx, reason in (([0, 5, 30, 7], r"says shape \(4,\)"), ([0, 5], r"says shape \(2,\)"),
                        ([0, 5, 5], "distinct"), ([0, 5, 31], "in \\[0, 31\\)"), ([-1, 0, 1], "in \\[0, 31\\)")):
        with pytest.raises(V.ReplyError, match=reason):
            V.decode_sparse(_sparse(idx, np.ones(len(idx))), LAYOUT, 3)


def test_encode_sparse_sends_exactly_k_entries_and_round_trips():
    message = {"a": np.array([0.0, 3.0, 0.0]), "b": np.array([[0.0, -1.0]])}
    layout = {k: np.zeros_like(v) for k, v in message.items()}
    record = R.encode_sparse(message, 4)
    assert record[R.SPARSE_INDICES].shape == (4,)
    got = V.decode_sparse(record, layout, 4)
    for k in message:
        np.testing.assert_array_equal(got[k], message[k])
    with pytest.raises(ValueError, match="k=1"):
        R.encode_sparse(message, 1)


def test_payload_bytes_counts_what_was_received_not_what_the_header_says():
    forged = ArrayRecord({"w": Array(dtype="float64", shape=(10**9,), stype=V.NUMPY_STYPE, data=_npy(np.zeros(2)))})
    assert V.payload_bytes(forged) == 16
    assert V.payload_bytes(R.to_record({"w": np.zeros(31)})) == 31 * 8
    garbage = ArrayRecord({"w": Array(dtype="float64", shape=(1,), stype=V.NUMPY_STYPE, data=b"xyz")})
    assert V.payload_bytes(garbage) == 3
    assert V.payload_bytes(None) == 0


@pytest.mark.parametrize(
    "config, reason",
    [
        ({}, "no 'partition-id'"),
        ({R.PARTITION_ID: 1.0}, "must be an integer"),
        ({R.PARTITION_ID: "0"}, "must be an integer"),
        ({R.PARTITION_ID: True}, "must be an integer"),
        ({R.PARTITION_ID: [0]}, "must be an integer"),
        ({R.PARTITION_ID: 7}, "outside 0..2"),
        ({R.PARTITION_ID: 0, R.NUM_PARTITIONS: 4}, "num-clients=3"),
    ],
)
def test_a_malformed_handshake_is_a_refusal(config, reason):
    with pytest.raises(V.ReplyError, match=reason):
        V.decode_handshake(RecordDict({R.CONFIG: ConfigRecord(config)}), 3)
    assert V.decode_handshake(RecordDict({R.CONFIG: ConfigRecord({R.PARTITION_ID: 2})}), 3) == 2
