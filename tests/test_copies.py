"""The server's copies of the clients' memories, kept in a file (fl_clip21.copies)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_clip21.copies import HEADER_ALIGN, CopiesError, MemoryCopies

LAYOUT = {
    "w": np.zeros((3, 4), dtype=np.float32),
    "b": np.zeros(4, dtype=np.float64),
    "steps": np.zeros((), dtype=np.int64),  # a torch buffer such as num_batches_tracked
}


def _value(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=4),
        "steps": np.asarray(seed, dtype=np.int64),
    }


def _equal(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


def test_a_new_file_holds_zero_copies_of_round_0_and_takes_no_disk(tmp_path):
    big = {"v": np.zeros(100_000)}
    copies = MemoryCopies(tmp_path / "c", big, num_clients=50)
    assert copies.path.stat().st_size == copies.size == HEADER_ALIGN + 50 * (16 + 800_000)  # tag, checksum, model
    assert copies.path.stat().st_blocks * 512 < copies.size / 100  # sparse until written
    _equal(copies.get(49, 0), {"v": np.zeros(100_000)})
    copies.close()
    reopened = MemoryCopies(tmp_path / "c", big, num_clients=50, create=False)  # unwritten slots check as they are
    _equal(reopened.get(7, 0), {"v": np.zeros(100_000)})
    assert reopened.path.stat().st_blocks * 512 < copies.size / 100


def test_put_and_get_keep_names_shapes_dtypes_and_values(tmp_path):
    copies = MemoryCopies(tmp_path / "c", LAYOUT, num_clients=3)
    for i in range(3):
        copies.put(i, _value(i + 1), round_=i + 1)
    for i in range(3):
        _equal(copies.get(i, i + 1), _value(i + 1))
    got = copies.get(0, 1)
    got["b"][0] = 99.0  # the caller's arrays are its own
    _equal(copies.get(0, 1), _value(1))


def test_add_sums_increments_like_the_clients_memory(tmp_path):
    copies = MemoryCopies(tmp_path / "c", LAYOUT, num_clients=2)
    total = {k: np.zeros_like(v) for k, v in LAYOUT.items()}
    last = 0
    for r in (1, 2, 5):
        inc = _value(r)
        copies.add(1, inc, last, r)
        total = {k: np.asarray(total[k] + inc[k], dtype=total[k].dtype) for k in total}
        last = r
    _equal(copies.get(1, 5), total)
    _equal(copies.get(0, 0), {k: np.zeros_like(v) for k, v in LAYOUT.items()})


def test_two_slots_keep_the_copy_a_checkpoint_refers_to(tmp_path):
    """A server that dies after applying round 3 finds each copy as of its checkpoint (round 2)."""
    copies = MemoryCopies(tmp_path / "c", LAYOUT, num_clients=1, slots=2)
    copies.add(0, _value(1), 0, 1)
    copies.add(0, _value(2), 1, 2)  # checkpoint of round 2 says: last applied 2
    copies.add(0, _value(3), 2, 3)  # applied in round 3, then the server dies
    copies.close()
    reopened = MemoryCopies(tmp_path / "c", LAYOUT, num_clients=1, slots=2, create=False)
    as_of_2 = reopened.get(0, 2)
    expect = {k: np.asarray(_value(1)[k] + _value(2)[k], dtype=v.dtype) for k, v in LAYOUT.items()}
    _equal(as_of_2, expect)
    reopened.add(0, _value(4), 2, 3)  # round 3 again, after the resume: replaces the lost attempt
    _equal(reopened.get(0, 2), expect)
    _equal(reopened.get(0, 3), {k: np.asarray(expect[k] + _value(4)[k], dtype=v.dtype) for k, v in LAYOUT.items()})


def test_a_round_the_file_does_not_hold_is_an_error_naming_client_round_and_file(tmp_path):
    copies = MemoryCopies(tmp_path / "c", LAYOUT, num_clients=2)
    copies.put(1, _value(1), round_=4)
    with pytest.raises(CopiesError, match=r"client 1 as of round 3 .*'.*c'.*holds rounds \[4\]"):
        copies.get(1, 3)
    with pytest.raises(IndexError, match=r"client must be in \[0, 2\), got 2"):
        copies.get(2, 0)
    with pytest.raises(ValueError, match=r"array 'b' has shape \(5,\), the model's is \(4,\)"):
        copies.put(0, {**_value(1), "b": np.zeros(5)}, round_=1)


def test_opening_a_missing_or_mismatched_file_names_it(tmp_path):
    with pytest.raises(CopiesError, match=r"copies file '.*nothing' is missing"):
        MemoryCopies(tmp_path / "nothing", LAYOUT, num_clients=2, create=False)
    MemoryCopies(tmp_path / "c", LAYOUT, num_clients=2).close()
    with pytest.raises(CopiesError, match=r"copies file '.*c' was made with num_clients=2; this run needs num_clients=3"):
        MemoryCopies(tmp_path / "c", LAYOUT, num_clients=3, create=False)
    with pytest.raises(ValueError, match="slots must be 1 or 2, got 3"):
        MemoryCopies(tmp_path / "d", LAYOUT, num_clients=1, slots=3)


def test_a_closed_file_says_so(tmp_path):
    copies = MemoryCopies(tmp_path / "c", LAYOUT, num_clients=1)
    copies.close()
    with pytest.raises(CopiesError, match="is closed"):
        copies.get(0, 0)


# --- corruption: an error naming the file, the client and the slot, never wrong data ----------------

_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _two_slot_file(path):
    """Two clients, two slots: client 1 slot 1 holds its copy as of round 1; every other slot is unwritten."""
    copies = MemoryCopies(path, LAYOUT, num_clients=2, slots=2)
    copies.add(1, _value(1), 0, 1)  # from the slot of round 0 (slot 0) into slot 1
    copies.flush()
    slot_bytes = (copies.size - HEADER_ALIGN) // 4
    return copies, slot_bytes


def _flip(path, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


@_FUZZ
@given(slot=st.sampled_from([(1, 1), (1, 0)]), where=st.floats(0, 1, exclude_max=True),
       mask=st.integers(1, 255))
def test_a_flipped_byte_in_a_slot_is_an_error_on_get_add_and_open(tmp_path, slot, where, mask):
    """Anywhere in the slot: its tag, its checksum or the model's bytes; written (1, 1) or not."""
    copies, slot_bytes = _two_slot_file(tmp_path / "c")
    client, s = slot
    _flip(copies.path, HEADER_ALIGN + (client * 2 + s) * slot_bytes + int(where * slot_bytes), mask)
    round_ = 1 if slot == (1, 1) else 0
    wrong = rf"copies file '.*c', client {client} slot {s}: checksum mismatch \(stored 0x[0-9a-f]{{16}}, computed"
    with pytest.raises(CopiesError, match=wrong):
        copies.get(client, round_)
    with pytest.raises(CopiesError, match=wrong):
        copies.add(client, _value(2), round_, 2)
    copies.close()
    with pytest.raises(CopiesError, match=wrong):
        MemoryCopies(tmp_path / "c", LAYOUT, num_clients=2, slots=2, create=False)


@_FUZZ
@given(where=st.floats(0, 1, exclude_max=True))
def test_a_truncated_file_is_an_error_saying_so(tmp_path, where):
    copies, _ = _two_slot_file(tmp_path / "c")
    os.truncate(copies.path, int(where * copies.size))
    with pytest.raises(CopiesError, match=r"copies file '.*c'.* is truncated: \d+ bytes"):
        MemoryCopies(tmp_path / "c", LAYOUT, num_clients=2, slots=2, create=False)
    with pytest.raises(CopiesError, match=r"copies file '.*c' is truncated: client 1 slot 1 at byte \d+: read"):
        copies.get(1, 1)  # the last slot: any cut reaches it


def test_a_file_of_another_layout_client_count_or_format_is_refused_by_its_header(tmp_path):
    _two_slot_file(tmp_path / "c")[0].close()

    def reopen(layout=LAYOUT, num_clients=2, slots=2):
        return MemoryCopies(tmp_path / "c", layout, num_clients=num_clients, slots=slots, create=False)

    with pytest.raises(CopiesError, match=r"copies file '.*c' holds copies of another model: array 0 is "
                                          r"\['w', '<f4', \[3, 4\]\] \(name, dtype, shape\) in the file, "
                                          r"\['w', '<f4', \[3, 5\]\] in this model"):
        reopen({**LAYOUT, "w": np.zeros((3, 5), dtype=np.float32)})
    with pytest.raises(CopiesError, match=r"holds copies of another model: array 1 is \['b', '<f8', \[4\]\]"):
        reopen({"w": LAYOUT["w"], "b": LAYOUT["b"].astype(np.float32), "steps": LAYOUT["steps"]})
    with pytest.raises(CopiesError, match=r"was made with slots=2; this run needs slots=1"):
        reopen(slots=1)
    _flip(tmp_path / "c", 8, 1)  # the version: 2 -> 3
    with pytest.raises(CopiesError, match=r"has format version 3; this version of fl-clip21 reads 2"):
        reopen()
    _flip(tmp_path / "c", 8, 1)
    _flip(tmp_path / "c", 40, 4)  # inside the JSON describing the layout
    with pytest.raises(CopiesError, match=r"copies file '.*c': header checksum mismatch"):
        reopen()
    (tmp_path / "c").write_bytes(bytes(2 * 2 * 96))  # format 1: no header, slots from byte 0
    with pytest.raises(CopiesError, match=r"does not start with b'FLC21CPY' \(it starts with b'\\x00.*format 1"):
        reopen()


def test_a_slot_another_process_wrote_or_with_an_impossible_tag_is_an_error(tmp_path):
    mine, _ = _two_slot_file(tmp_path / "c")
    other = MemoryCopies(tmp_path / "c", LAYOUT, num_clients=2, slots=2, create=False)
    other.put(0, _value(5), round_=5)
    with pytest.raises(CopiesError, match=r"client 0 slot 0: holds round 5, this process wrote round 0 there"):
        mine.get(0, 0)
    # A negative tag with a valid checksum comes only from a writer other than MemoryCopies.
    slot_bytes = (mine.size - HEADER_ALIGN) // 4
    with open(tmp_path / "c", "r+b") as f:
        f.seek(HEADER_ALIGN + 3 * slot_bytes)  # client 1 slot 1
        payload = f.read(slot_bytes)[16:]
        f.seek(HEADER_ALIGN + 3 * slot_bytes)
        f.write(struct.pack("<qQ", -3, mine._checksum(1, 1, -3, [payload])))
    with pytest.raises(CopiesError, match=r"client 1 slot 1: impossible tag -3 \(a round is >= 0\)"):
        MemoryCopies(tmp_path / "c", LAYOUT, num_clients=2, slots=2, create=False)
    with pytest.raises(ValueError, match=r"copy of client 0: round must be >= 0, got -1"):
        mine.put(0, _value(1), round_=-1)


def _held_bytes(obj, seen=None) -> int:
    """Bytes of the arrays and byte strings reachable from ``obj`` through dicts, lists, tuples and sets."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bytes, str)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_held_bytes(k, seen) + _held_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(_held_bytes(v, seen) for v in obj)
    return 0


def test_after_a_real_run_the_strategy_holds_no_model_per_client_and_its_copies_average_to_g(tmp_path):
    """In RAM the server holds x and g; the n copies are in the file, and g = mean of them."""
    from flwr.serverapp import ServerApp

    from fl_clip21 import core
    from fl_clip21.algorithms import algorithm_from_config
    from fl_clip21.config import resolve
    from fl_clip21.flower import records as R
    from fl_clip21.flower.client import make_client_app
    from fl_clip21.flower.simulation import fast_polling, simulate_app
    from fl_clip21.flower.strategy import Clip21Strategy
    from fl_clip21.problems import build_problem

    n, d = 8, 50_000
    cfg = resolve({"algorithms": ["clip21-gd"], "rounds": 3, "lr": 1.0, "tau": 1.0, "num-clients": n, "fraction": 0.5,
                   "problem": {"name": "mean-estimation", "dim": d}})
    out = {}
    app = ServerApp()

    @app.main()
    def _main(grid, context):
        fast_polling(grid)
        strategy = Clip21Strategy(
            algorithm=algorithm_from_config("clip21-gd", cfg), scenario=cfg, num_clients=n, fraction=0.5,
            copies_dir=tmp_path,
        )
        strategy.start(grid=grid, initial_arrays=R.to_record(build_problem(cfg).init_params()), num_rounds=3)
        out["strategy"] = strategy

    simulate_app(app, make_client_app(), cfg)
    strategy = out["strategy"]
    model = d * 8
    assert 2 * model <= _held_bytes(vars(strategy)) < 3 * model  # x and g, and a few bytes per client
    assert strategy.protocol.copies.path.parent == tmp_path
    assert strategy.protocol.last_applied.max() == 3 and strategy.protocol.last_applied.min() < 3  # copies of different rounds
    copies = [strategy.server_copy(i) for i in range(n)]
    assert core.max_abs_diff(core.mean(copies), strategy.server_state["g"]) < 1e-15
    assert core.global_norm(copies[int(strategy.protocol.last_applied.argmax())]) > 0


def test_a_checkpoint_with_the_copies_inside_it_still_resumes(tmp_path):
    """Checkpoints written before the copies file held every copy in the .npz: they load into a new file."""
    from fl_clip21 import checkpoint as ckpt
    from fl_clip21.algorithms import make_algorithm
    from fl_clip21.flower.strategy import Clip21Strategy

    n = 3
    params = {"w": np.zeros(4), "b": np.zeros(1)}
    shadows = [{"w": np.full(4, i + 1.0), "b": np.full(1, -1.0 * i)} for i in range(n)]
    meta = {"algorithm": "clip21-gd", "hyper": {"lr": 1.0, "tau": 1.0}, "num_clients": n, "seed": 0, "session": "s", "round": 7,
            "times_asked": [7, 7, 7], "last_applied": [7, 5, 0], "history": []}
    arrays = {"params": params, "server.g": {"w": np.full(4, 2.0), "b": np.full(1, -1.0)}}
    arrays.update({f"shadow.{i}": v for i, v in enumerate(shadows)})
    ckpt.save(tmp_path / "old.npz", arrays, meta)
    strategy = Clip21Strategy(algorithm=make_algorithm("clip21-gd", lr=1.0, tau=1.0), scenario=None, num_clients=n,
                              checkpoint=tmp_path / "new.npz")
    assert strategy.resume(tmp_path / "old.npz") == 7
    for i in range(n):
        _equal(strategy.server_copy(i), shadows[i])
    assert strategy.protocol.copies.path == tmp_path / "new.npz.copies"


def test_a_resume_from_a_corrupted_copies_file_or_checkpoint_is_refused_naming_it(tmp_path):
    """The strategy's resume reads both through the verified readers: no trajectory from wrong copies."""
    from fl_clip21 import checkpoint as ckpt
    from fl_clip21.algorithms import make_algorithm
    from fl_clip21.flower.strategy import Clip21Strategy

    n = 2
    params = {"w": np.zeros(4), "b": np.zeros(1)}
    copies = MemoryCopies(tmp_path / "run.npz.copies", params, num_clients=n, slots=2)
    copies.put(0, {"w": np.ones(4), "b": np.ones(1)}, round_=3)
    copies.close()
    meta = {"algorithm": "clip21-gd", "hyper": {"lr": 1.0, "tau": 1.0}, "num_clients": n, "seed": 0, "session": "s", "round": 3,
            "times_asked": [3, 0], "last_applied": [3, 0], "history": [], "copies": "run.npz.copies"}
    ckpt.save(tmp_path / "run.npz", {"params": params, "server.g": {"w": np.full(4, 0.5), "b": np.full(1, 0.5)}}, meta)

    def resume():
        strategy = Clip21Strategy(algorithm=make_algorithm("clip21-gd", lr=1.0, tau=1.0), scenario=None,
                                  num_clients=n, checkpoint=tmp_path / "run.npz")
        return strategy.resume(tmp_path / "run.npz")

    assert resume() == 3
    _flip(tmp_path / "run.npz.copies", HEADER_ALIGN + 16 + 3, 0x40)  # client 0 slot 0, in w[0]
    with pytest.raises(CopiesError, match=r"copies file '.*run.npz.copies', client 0 slot 0: checksum mismatch"):
        resume()
    params["w"][2] = np.nan
    ckpt.save(tmp_path / "run.npz", {"params": params, "server.g": {"w": np.full(4, 0.5), "b": np.full(1, 0.5)}}, meta)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint '.*run.npz': array 'params/w' holds 1 non-finite"):
        resume()
