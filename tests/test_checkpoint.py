"""Checkpoints (fl_clip21.checkpoint): a corrupted one is a CheckpointError naming the file, never wrong data."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_clip21 import checkpoint as ckpt
from fl_clip21.checkpoint import ARRAYS, META, CheckpointError, compare_config

META_IN = {"algorithm": "clip21-gd", "round": 7, "last_applied": [7, 5, 0], "hyper": {"tau": 0.1}, "copies": None}

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _arrays() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "params": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4)},
        "server.g": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4)},
        "server.step": {"": np.asarray(12, dtype=np.int64), "on": np.asarray([True, False])},
    }


def _saved(tmp_path, arrays=None, meta=None):
    path = tmp_path / "run-0" / "clip21-gd.npz"
    ckpt.save(path, _arrays() if arrays is None else arrays, META_IN if meta is None else meta)
    return path


def _equal(got, want) -> None:
    assert got.keys() == want.keys()
    for g in want:
        assert got[g].keys() == want[g].keys(), g
        for k in want[g]:
            assert got[g][k].dtype == want[g][k].dtype and got[g][k].shape == want[g][k].shape, (g, k)
            np.testing.assert_array_equal(got[g][k], want[g][k])


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _write_members(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw)


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _refused(path, match: str | None = None, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        ckpt.load(path, **kwargs)
    assert f"checkpoint {str(path)!r}" in str(info.value)
    return info.value


def test_round_trip_keeps_groups_names_dtypes_values_and_meta(tmp_path):
    arrays, meta = ckpt.load(_saved(tmp_path))
    _equal(arrays, _arrays())
    assert meta == META_IN  # the record of the arrays stays inside the file


def test_the_metadata_records_every_array_and_save_keeps_the_key_for_it(tmp_path):
    path = _saved(tmp_path)
    with np.load(path) as data:
        record = json.loads(bytes(data[META]))[ARRAYS]
    assert record["params/w"]["dtype"] == "<f4" and record["params/w"]["shape"] == [3, 4]
    assert len(record["params/w"]["sha256"]) == 64 and set(record) == {
        "params/w", "params/b", "server.g/w", "server.g/b", "server.step/", "server.step/on"}
    with pytest.raises(ValueError, match="meta may not have the key '__arrays__'"):
        ckpt.save(tmp_path / "x.npz", _arrays(), {ARRAYS: 1})


@_FUZZ
@given(where=st.floats(0, 1, exclude_max=True))
def test_a_checkpoint_cut_at_any_length_is_refused(tmp_path, where):
    path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(where * len(raw))])
    _refused(path)


@_FUZZ
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_a_flipped_byte_anywhere_is_refused_or_changes_nothing(tmp_path, where, mask):
    """Some bytes of a zip (times, the version that made it) change no data: those may load, unchanged."""
    path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[int(where * len(raw))] ^= mask
    path.write_bytes(bytes(raw))
    try:
        arrays, meta = ckpt.load(path)
    except CheckpointError as e:
        assert f"checkpoint {str(path)!r}" in str(e)
    else:
        _equal(arrays, _arrays())
        assert meta == META_IN


def test_a_replaced_missing_or_extra_member_is_refused(tmp_path):
    path = _saved(tmp_path)
    members = _members(path)
    _write_members(path, {**members, "params/w.npy": _npy(np.zeros((3, 4), dtype=np.float32))})  # a valid zip
    _refused(path, r"array 'params/w': sha256 mismatch \(recorded [0-9a-f]{64}, computed [0-9a-f]{64}\)")
    _write_members(path, {**members, "params/w.npy": _npy(np.zeros((3, 5), dtype=np.float32))})
    _refused(path, r"array 'params/w' has shape \[3, 5\], its record says \[3, 4\]")
    _write_members(path, {**members, "params/w.npy": _npy(np.zeros((3, 4)))})
    _refused(path, r"array 'params/w' has dtype <f8, its record says <f4")
    _write_members(path, {k: v for k, v in members.items() if k != "server.g/b.npy"})
    _refused(path, r"arrays \['server.g/b'\] of the metadata's record are missing from the file")
    _write_members(path, {**members, "server.h/w.npy": _npy(np.zeros(2))})
    _refused(path, r"members \['server.h/w'\] are not in the metadata's record of the arrays")
    _write_members(path, {**members, "params/w.npy": b"not an array"})
    _refused(path, r"member 'params/w' is not a .npy array")
    _write_members(path, {**members, "params/w.npy": _npy(np.array([{"a": 1}], dtype=object))})
    _refused(path, r"member 'params/w' cannot be read: ValueError: .*allow_pickle=False")


def test_non_finite_state_is_refused_unless_asked_for(tmp_path):
    arrays = _arrays()
    arrays["params"]["w"][1, 2] = np.nan
    path = _saved(tmp_path, arrays)
    _refused(path, r"array 'params/w' holds 1 non-finite values \(NaN or inf\) of 12; the state of a run must be finite")
    got, _ = ckpt.load(path, finite=False)
    assert np.isnan(got["params"]["w"][1, 2])
    arrays = _arrays()
    arrays["server.g"]["b"][0] = -np.inf
    _refused(_saved(tmp_path, arrays), r"array 'server.g/b' holds 1 non-finite values")


def test_missing_or_malformed_metadata_is_refused(tmp_path):
    path = _saved(tmp_path)
    members = _members(path)
    _write_members(path, {k: v for k, v in members.items() if k != f"{META}.npy"})
    _refused(path, r"has no member '__meta__.json' \(the run's metadata\)")
    for text, match in [(b"{not json", "is not JSON"), (b"[1, 2]", "is a JSON list, not an object"),
                        (b"\xff\xfe", "is not JSON")]:
        _write_members(path, {**members, f"{META}.npy": _npy(np.frombuffer(text, dtype=np.uint8))})
        _refused(path, rf"member '__meta__.json' {match}")
    _write_members(path, {**members, f"{META}.npy": _npy(np.zeros(3))})
    _refused(path, r"member '__meta__.json' is not the bytes of a JSON text")
    meta = json.loads(bytes(np.load(io.BytesIO(members[f"{META}.npy"]))))
    meta[ARRAYS]["params/w"] = {"sha256": "x"}
    _write_members(path, {**members, f"{META}.npy": _npy(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))})
    _refused(path, r"the metadata's record of array 'params/w' is malformed: \{'sha256': 'x'\}")


def test_a_file_that_is_no_npz_is_refused_and_a_missing_one_is_not_found(tmp_path):
    path = tmp_path / "c.npz"
    for raw in [b"", b"hello", b"PK\x03\x04 broken zip", _npy(np.zeros(3))]:
        path.write_bytes(raw)
        _refused(path)
    _refused(path, r"is a single .npy array, not an .npz")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: '.*nothing.npz'"):
        ckpt.load(tmp_path / "nothing.npz")


def test_a_checkpoint_written_before_the_record_still_loads_and_is_checked_for_being_finite(tmp_path):
    path = tmp_path / "old.npz"
    flat = {f"{g}/{k}": v for g, group in _arrays().items() for k, v in group.items()}
    meta = np.frombuffer(json.dumps(META_IN).encode(), dtype=np.uint8)
    np.savez(path, **flat, **{META: meta})  # what save wrote before it recorded the arrays
    arrays, got = ckpt.load(path)
    _equal(arrays, _arrays())
    assert got == META_IN
    np.savez(path, **{**flat, "params/b": np.full(4, np.nan)}, **{META: meta})
    _refused(path, r"array 'params/b' holds 4 non-finite values")


# --- compare_config ---------------------------------------------------------------------------------

WHAT = "checkpoint '/x/run-0/clip21-gd.npz'"


def test_compare_config_accepts_equal_configs_read_back_from_json():
    saved = {"tau": 0.1, "algorithms": ["clip21-gd"], "problem": {"name": "logreg", "dim": 10}}
    compare_config(saved, {"problem": {"dim": 10, "name": "logreg"}, "algorithms": ("clip21-gd",), "tau": 0.1}, WHAT)


@pytest.mark.parametrize("saved, current, message", [
    ({"tau": 0.1}, {"tau": 0.2}, "was made with tau=0.1, this run has tau=0.2"),
    ({"tau": 0.1, "lr": 1.0}, {"tau": 0.1}, "was made with lr=1.0, this run has no lr"),
    ({"tau": 0.1}, {"tau": 0.1, "lr": 1.0}, "was made without lr, this run has lr=1.0"),
    ({"problem": {"name": "logreg", "dim": 10}}, {"problem": {"name": "logreg", "dim": 20}},
     "was made with problem.dim=10, this run has problem.dim=20"),
    ({"algorithms": ["gd", "clip21-gd"]}, {"algorithms": ["gd"]},
     "was made with algorithms=['gd', 'clip21-gd'], this run has algorithms=['gd']"),
    ({"audit": True}, {"audit": 1}, "was made with audit=True, this run has audit=1"),
    ({"a": 1, "b": 2}, {"a": 0, "b": 0}, "was made with a=1, this run has a=0"),  # the first key
])
def test_compare_config_names_the_first_differing_key_and_both_values(saved, current, message):
    with pytest.raises(CheckpointError) as info:
        compare_config(saved, current, WHAT)
    assert str(info.value) == f"{WHAT} {message}"
