"""Fault injection in real Flower simulations: g == mean(v_i) stays exact.

Every run audits the invariant from the memories the clients report out of
their own context.state, each round (``invariant_gap``).
"""

from __future__ import annotations

import numpy as np
import pytest

from fl_clip21.config import resolve
from fl_clip21.engine import run_local
from fl_clip21.flower.client import make_client_app
from fl_clip21.flower.faults import drop_reply_mod, scale_reply_mod, stale_reply_mod, wipe_state_mod
from fl_clip21.flower.simulation import SimulationError, simulate

GAP = 1e-12  # float rounding only
_SEEN: dict[str, float] = {"invariant_gap": 0.0, "memory_gap": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _print_largest_gaps():
    """``pytest tests/test_faults.py -s`` prints the figure the closing notes quote."""
    yield
    print(
        f"\nfault runs: largest |g - mean v_i| = {_SEEN['invariant_gap']:.3g}, "
        f"largest |v_i - server's copy| at a round's start = {_SEEN['memory_gap']:.3g}"
    )


def _assert_invariant(recs):
    """g == mean(v_i), and every client started each round from the server's copy of its memory."""
    for key in _SEEN:
        worst = max(r[key] for r in recs)
        _SEEN[key] = max(_SEEN[key], worst)
        assert worst < GAP, (key, worst)


def _cfg(**over):
    base = {
        "algorithms": ["clip21-gd"], "rounds": 50, "lr": 1.0, "tau": 0.1, "num-clients": 10, "audit": True,
        "target": 1e-8, "problem": {"name": "logreg"}, "partition": {"kind": "label-sorted"},
    }
    base.update(over)
    return resolve(base)


def _final_gns(res):
    return res["records"][-1]["grad_norm_sq"]


def test_lost_replies_keep_the_invariant_and_the_run_converges():
    cfg = _cfg(rounds=80)
    res = simulate(cfg, client_app=make_client_app(train_mods=[drop_reply_mod(0.2, seed=7)]))["clip21-gd"]
    recs = res["records"]
    lost = sum(r["failed"] for r in recs)
    assert 0.1 * 800 < lost < 0.3 * 800  # about 20% of 80 rounds x 10 clients
    _assert_invariant(recs)
    assert _final_gns(res) <= cfg["target"]  # the fault-free run reaches it by round 30


def test_late_replies_and_wiped_client_state_keep_the_invariant():
    cfg = _cfg(rounds=60)
    mods = [stale_reply_mod(clients=[2], rounds=range(5, 12)), wipe_state_mod(clients=[4, 5], rounds=[10, 30])]
    res = simulate(cfg, client_app=make_client_app(train_mods=mods))["clip21-gd"]
    recs = res["records"]
    assert sum(r["rejected"] for r in recs) == 7  # the late replies
    assert sum(r["resyncs"] for r in recs) == 4  # two clients asked twice to be resynced
    _assert_invariant(recs)
    assert _final_gns(res) <= cfg["target"]


@pytest.mark.slow  # hostile replies: tests/test_strategy.py (property test) and test_flower.py
def test_oversized_increments_are_rejected_and_the_run_recovers():
    cfg = _cfg(rounds=60, fraction=0.5)
    mods = [scale_reply_mod(1e6, clients=[0, 3], rounds=range(1, 21))]
    res = simulate(cfg, client_app=make_client_app(train_mods=mods))["clip21-gd"]
    recs = res["records"]
    assert sum(r["rejected"] for r in recs) > 0
    _assert_invariant(recs)
    assert _final_gns(res) <= cfg["target"]


class _Stop(Exception):
    pass


def test_server_stopped_and_resumed_from_its_checkpoint_gives_the_same_trajectory(tmp_path):
    cfg = _cfg(rounds=40, algorithms=["clip21-gd", "gd"])

    def stop_after_15(name, rec, rounds):
        if name == "clip21-gd" and rec["round"] == 15:
            raise _Stop("server stopped")

    with pytest.raises(SimulationError):
        simulate(cfg, on_round=stop_after_15, checkpoint_dirs=[tmp_path])
    assert (tmp_path / "clip21-gd.npz").exists() and not (tmp_path / "gd.npz").exists()
    # The server's copies of the clients' memories are in a file beside it, not in the checkpoint.
    assert (tmp_path / "clip21-gd.npz.copies").stat().st_size > 10 * 2 * 8 * 15
    with np.load(tmp_path / "clip21-gd.npz") as data:
        assert {name.partition("/")[0] for name in data.files} == {"params", "server.g", "__meta__.json"}
    # A new simulation: new nodes with empty state, the server's state from the checkpoint.
    resumed = simulate(cfg, checkpoint_dirs=[tmp_path])
    fresh = run_local(cfg, "clip21-gd")
    recs = resumed["clip21-gd"]["records"]
    assert [r["round"] for r in recs] == list(range(1, 41))
    assert resumed["clip21-gd"]["resumed_from_round"] == 15
    assert recs[15]["resyncs"] == 0 and recs[15]["accepted"] == 10  # resynced in the same round
    for a, b in zip(recs, fresh["records"]):
        assert a["grad_norm_sq"] == pytest.approx(b["grad_norm_sq"], rel=1e-9, abs=1e-30)
    for k in fresh["params"]:
        np.testing.assert_allclose(resumed["clip21-gd"]["params"][k], fresh["params"][k], rtol=1e-12, atol=1e-15)
    _assert_invariant(recs[15:])


@pytest.mark.slow  # the verified copies file: tests/test_copies.py
def test_resuming_without_the_copies_file_is_an_error_naming_it(tmp_path):
    cfg = _cfg(rounds=6, audit=False)

    def stop_after_3(name, rec, rounds):
        if rec["round"] == 3:
            raise _Stop("server stopped")

    with pytest.raises(SimulationError):
        simulate(cfg, on_round=stop_after_3, checkpoint_dirs=[tmp_path])
    copies = tmp_path / "clip21-gd.npz.copies"
    copies.unlink()
    with pytest.raises(SimulationError, match=f"copies file '{copies}' is missing"):
        simulate(cfg, checkpoint_dirs=[tmp_path])
    assert (tmp_path / "clip21-gd.npz").exists()  # the checkpoint is left as it was
