"""The strategy's state in a checkpoint (fl_clip21.flower.saved_state): saved, checked, restored.

Each test: Prepare (a checkpoint and its copies file, as a strategy writes
them, then damaged or edited), Execute (load, check, restore), Assert (what is
restored, or the error naming the file, the key and the values).
"""

from __future__ import annotations

import numpy as np
import pytest

from fl_clip21 import checkpoint as ckpt
from fl_clip21.copies import HEADER_ALIGN, CopiesError, MemoryCopies
from fl_clip21.flower import saved_state as S

N = 3
PARAMS = {"w": np.zeros(4), "b": np.zeros(1)}
HYPER = {"lr": 1.0, "tau": 0.5}


def _copy(i: int) -> dict[str, np.ndarray]:
    return {"w": np.full(4, i + 1.0), "b": np.full(1, -float(i))}


def _meta(**changes) -> dict:
    meta = {
        "algorithm": "clip21-gd", "hyper": HYPER, "num_clients": N, "seed": 7, "config": {"tau": 0.5},
        "session": "abc", "round": 4, "history": [{"round": r} for r in range(1, 5)],
        "protocol": {"times_asked": [4, 4, 4], "last_applied": [4, 2, 0], "zeroed": []},
        "registry": {"last_node": {"0": 10}}, "copies": "run.npz.copies",
    }
    meta.update(changes)
    return meta


def _checkpoint(tmp_path, **changes):
    """A checkpoint of round 4 and its copies file (client i's copy as of round last_applied[i])."""
    path = tmp_path / "run.npz"
    copies = MemoryCopies(S.copies_path(path), PARAMS, N, slots=S.SLOTS)
    for i, r in enumerate([4, 2, 0]):
        copies.put(i, _copy(i), r)
    g = {"w": np.full(4, 0.5), "b": np.zeros(1)}
    S.save(path, {"w": np.ones(4), "b": np.ones(1)}, {"g": g}, _meta(**changes), copies)
    copies.close()
    return path


def _load(path, **changes):
    kwargs = {"algorithm": "clip21-gd", "hyper": HYPER, "num_clients": N, "seed": 7, "config": {"tau": 0.5}}
    kwargs.update(changes)
    return S.load(path, **kwargs)


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_checkpoint_loads_back_with_every_part(tmp_path):
    # Prepare
    path = _checkpoint(tmp_path)
    # Execute
    saved = _load(path)
    # Assert
    np.testing.assert_array_equal(saved.params["w"], np.ones(4))
    np.testing.assert_array_equal(saved.server_state["g"]["w"], np.full(4, 0.5))
    assert (saved.num_clients, saved.session, saved.round, len(saved.history)) == (N, "abc", 4, 4)
    assert saved.last_applied == [4, 2, 0] and saved.registry == {"last_node": {"0": 10}}
    assert saved.copies == "run.npz.copies"
    assert _load(path, num_clients=None).num_clients == N  # a run that counted its nodes takes the saved n


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hyper": {"lr": 1.0, "tau": 0.6}}, "was made with hyper.tau=0.5, this run has hyper.tau=0.6"),
        ({"seed": 8}, "was made with seed=7, this run has seed=8"),
        ({"num_clients": 4}, "was made with num_clients=3, this run has num_clients=4"),
        ({"algorithm": "ef21"}, "was made with algorithm='clip21-gd', this run has algorithm='ef21'"),
        ({"config": {"tau": 0.6}}, "was made with tau=0.5, this run has tau=0.6"),
    ],
)
def test_a_checkpoint_of_another_configuration_is_refused_naming_the_key_and_both_values(tmp_path, change, message):
    path = _checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint '.*run.npz' {message}"):
        _load(path, **change)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_clients": "3"}, "num_clients must be an integer >= 1, got '3'"),
        ({"session": None, "round": "four"}, "ValueError: invalid literal"),
        ({"protocol": {"times_asked": [1, 1, 1], "last_applied": [1, 1]}}, "2 clients' acks, num_clients is 3"),
        ({"protocol": [1, 2]}, "protocol and registry must be JSON objects"),
        ({"copies": "../elsewhere.copies"}, "copies must be a file name ending in '.copies' beside it"),
        ({"copies": "run.npz"}, "copies must be a file name ending in '.copies'"),
    ],
)
def test_a_malformed_checkpoint_is_refused_naming_the_file(tmp_path, change, message):
    path = _checkpoint(tmp_path, **change)
    arrays, meta = ckpt.load(path)
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint '.*run.npz' is incomplete or malformed .*{message}"):
        S.parse(path, arrays, meta)


def test_check_copies_refuses_a_flipped_byte_and_changes_nothing(tmp_path):
    # Prepare: a byte of client 1's copy (slot 0) flipped.
    path = _checkpoint(tmp_path)
    arrays, meta = ckpt.load(path)
    S.check_copies(path, arrays, meta)
    slot = (S.copies_path(path).stat().st_size - HEADER_ALIGN) // (N * S.SLOTS)
    _flip(S.copies_path(path), HEADER_ALIGN + 2 * slot + 16)
    before = S.copies_path(path).read_bytes(), path.read_bytes()
    # Execute, Assert
    with pytest.raises(CopiesError, match=r"copies file '.*run.npz.copies', client 1 slot 0: checksum mismatch"):
        S.check_copies(path, arrays, meta)
    assert (S.copies_path(path).read_bytes(), path.read_bytes()) == before


def test_a_copies_file_without_the_round_the_checkpoint_refers_to_is_refused(tmp_path):
    path = _checkpoint(tmp_path, protocol={"times_asked": [4, 4, 4], "last_applied": [4, 3, 0]})
    arrays, meta = ckpt.load(path)
    with pytest.raises(CopiesError, match=r"copy of client 1 as of round 3 is not in '.*run.npz.copies'"):
        S.check_copies(path, arrays, meta)
    S.copies_path(path).unlink()
    with pytest.raises(CopiesError, match=r"copies file '.*run.npz.copies' is missing"):
        S.check_copies(path, arrays, meta)


def test_restore_carries_on_in_the_same_file_or_copies_every_client_into_a_new_one(tmp_path):
    # Prepare
    path = _checkpoint(tmp_path)
    saved = _load(path)
    # Execute: the same run's file, then another file.
    same = S.restore_copies(path, saved, new=lambda: pytest.fail("no new file"), carry_on_in=S.copies_path(path))
    target = tmp_path / "other.copies"
    moved = S.restore_copies(path, saved, new=lambda: MemoryCopies(target, PARAMS, N, slots=S.SLOTS))
    # Assert
    assert same.path == S.copies_path(path) and moved.path == target
    for i, r in enumerate(saved.last_applied):
        for copies in (same, moved):
            got = copies.get(i, r)
            np.testing.assert_array_equal(got["w"], _copy(i)["w"])
            np.testing.assert_array_equal(got["b"], _copy(i)["b"])
    same.close()
    moved.close()
