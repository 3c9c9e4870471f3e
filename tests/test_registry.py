"""Partition binding and node identity (fl_clip21.flower.registry), and the protocol state it drives."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fl_clip21 import core
from fl_clip21.copies import MemoryCopies
from fl_clip21.flower.protocol import ProtocolState
from fl_clip21.flower.registry import NodeRegistry, Refused


def test_first_claims_bind_and_a_claim_on_a_connected_nodes_partition_is_refused():
    # Prepare
    reg = NodeRegistry(3)
    # Execute
    first = [reg.claim(10 + i, i, connected={10, 11, 12}) for i in range(3)]
    # Assert
    assert all(b.new for b in first) and reg.client_of_node == {10: 0, 11: 1, 12: 2}
    with pytest.raises(Refused, match="partition 0, which node 10 holds and is still connected"):
        reg.claim(99, 0, connected={10, 11, 12, 99})
    assert reg.client_of_node == {10: 0, 11: 1, 12: 2}


def test_a_node_taking_over_a_partition_whose_node_left_is_not_proven():
    reg = NodeRegistry(2)
    reg.claim(10, 0, connected={10})
    assert reg.forget_gone({11}) == [(10, 0)]
    takeover = reg.claim(99, 0, connected={99})
    assert takeover.new and not takeover.proven
    assert reg.node_of(0) == 99


def test_the_same_node_coming_back_is_proven():
    reg = NodeRegistry(2)
    reg.claim(10, 0, connected={10})
    reg.forget_gone(set())
    back = reg.claim(10, 0, connected={10})
    assert back.new and back.proven
    again = reg.claim(10, 0, connected={10})
    assert not again.new and again.proven


def test_a_node_holds_one_partition():
    reg = NodeRegistry(2)
    reg.claim(10, 0, connected={10})
    with pytest.raises(Refused, match="already holds partition 0"):
        reg.claim(10, 1, connected={10})


def test_with_a_key_map_only_the_partitions_key_may_claim_it():
    reg = NodeRegistry(2, node_keys={b"key-0": 0, b"key-1": 1})
    with pytest.raises(Refused, match="not in the key map"):
        reg.claim(10, 0, connected={10}, public_key=b"stranger")
    with pytest.raises(Refused, match="not in the key map"):
        reg.claim(10, 0, connected={10}, public_key=None)
    with pytest.raises(Refused, match="partition 1's"):
        reg.claim(10, 0, connected={10}, public_key=b"key-1")
    ok = reg.claim(10, 0, connected={10}, public_key=b"key-0")
    assert ok.proven
    reg.forget_gone(set())
    restarted = reg.claim(77, 0, connected={77}, public_key=b"key-0")  # a new node id, the same key
    assert restarted.new and restarted.proven


def test_engine_made_claims_are_proven():
    reg = NodeRegistry(1, trust_claims=True)
    reg.claim(10, 0, connected={10})
    reg.forget_gone(set())
    assert reg.claim(11, 0, connected={11}).proven


def test_state_dict_round_trip_keeps_the_last_node_of_each_client():
    reg = NodeRegistry(2)
    reg.claim(10, 0, connected={10})
    reg.claim(11, 1, connected={10, 11})
    other = NodeRegistry(2)
    other.load_state_dict(reg.state_dict())
    assert other.client_of_node == {}  # nobody is connected until it claims again
    assert other.claim(10, 0, connected={10}).proven and not other.claim(12, 1, connected={10, 12}).proven


def test_claims_outside_the_partitions_are_refused():
    with pytest.raises(Refused, match="outside 0..1"):
        NodeRegistry(2).claim(10, 2, connected={10})


# --- protocol state ------------------------------------------------------------------


def _protocol(tmp_path, n=3, slots=2):
    layout = {"w": np.zeros(4)}
    return ProtocolState(n, MemoryCopies(tmp_path / "c", layout, n, slots=slots), layout=layout)


def test_apply_adds_to_the_copy_and_moves_the_ack(tmp_path):
    p = _protocol(tmp_path)
    p.apply(1, {"w": np.ones(4)}, 1)
    p.apply(1, {"w": np.ones(4)}, 2)
    np.testing.assert_array_equal(p.copy(1)["w"], np.full(4, 2.0))
    assert p.ack(1) == 2 and p.ack(0) == 0 and p.has_history(1) and not p.has_history(0)


def test_reset_zeroes_the_copy_returns_the_old_one_and_keeps_the_checkpointed_slot(tmp_path):
    p = _protocol(tmp_path)
    p.apply(0, {"w": np.full(4, 3.0)}, 1)
    old = p.reset(0)
    np.testing.assert_array_equal(old["w"], np.full(4, 3.0))
    assert core.global_norm(p.copy(0)) == 0 and 0 in p.needs_resync and not p.has_history(0)
    # The file still holds the copy of round 1, which a checkpoint of round 1 refers to.
    np.testing.assert_array_equal(p.copies.get(0, 1)["w"], np.full(4, 3.0))
    p.apply(0, {"w": np.ones(4)}, 2)  # after the reset the copy is the increments since
    np.testing.assert_array_equal(p.copy(0)["w"], np.ones(4))
    np.testing.assert_array_equal(p.copies.get(0, 1)["w"], np.full(4, 3.0))


def test_end_round_resyncs_the_asked_clients_whose_increment_was_not_applied(tmp_path):
    p = _protocol(tmp_path)
    p.end_round(asked={0, 1, 2}, applied={1})
    assert p.needs_resync == {0, 2}
    p.end_round(asked={0}, applied={0})
    assert p.needs_resync == {2}


def test_protocol_state_dict_round_trip_and_every_client_is_resynced(tmp_path):
    p = _protocol(tmp_path)
    p.times_asked[:] = [3, 2, 1]
    p.apply(2, {"w": np.ones(4)}, 3)
    p.reset(1)
    q = ProtocolState(3, p.copies, layout={"w": np.zeros(4)})
    q.load_state_dict(p.state_dict())
    assert q.times_asked.tolist() == [3, 2, 1] and q.ack(2) == 3 and q.zeroed == {1}
    assert q.needs_resync == {0, 1, 2}
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        q.load_state_dict({"times_asked": [1], "last_applied": [0, 0, 0]})


# --- late replies ----------------------------------------------------------------------


def test_a_node_started_again_is_not_waited_for_its_late_reply(flower_task):
    from flwr.app import Message, MessageType, RecordDict
    from flwr.proto.node_pb2 import NodeInfo

    from fl_clip21.flower.late import LateReplies

    class Grid:
        activated = {5: "t0", 6: "t0"}

        def get_nodes(self):
            return [NodeInfo(node_id=n, last_activated_at=t) for n, t in self.activated.items()]

        def pull_messages(self, ids):
            return []

    grid, late = Grid(), LateReplies(wait=0.3)
    messages = [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.TRAIN) for n in (5, 6)]
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"m{i}"
    late.sending(messages)
    late.round_over(answered=set(), grid=grid)
    assert late.pending == {5: "m0", 6: "m1"}
    grid.activated[5] = "t1"  # node 5's process was killed and started again
    t0 = time.monotonic()
    late.await_nodes(grid, [5])
    assert time.monotonic() - t0 < 0.25 and 5 not in late.pending  # not waited for
    late.await_nodes(grid, [6])
    assert time.monotonic() - t0 >= 0.3 and late.pending == {}  # waited for, then given up
