"""The handshake with the nodes and their binding to clients (fl_clip21.flower.nodes), on a fake grid.

Each test: Prepare (a NodeSync and a grid whose nodes claim partitions, some of
them hostile or broken), Execute (a sync, a wait, a count), Assert (the
bindings, who was asked, what was logged).
"""

from __future__ import annotations

import logging

import pytest
from fake_grid import FakeGrid
from flwr.app import ConfigRecord, Error, RecordDict
from flwr.common.constant import ErrorCode

from fl_clip21.flower import nodes as N
from fl_clip21.flower import records as R
from fl_clip21.flower.nodes import ClientSetupError, NodeSync

pytestmark = pytest.mark.usefixtures("flower_task")


def _sync(n=3, handshake=True, **kwargs) -> NodeSync:
    return NodeSync(num_clients=n, handshake=handshake, trust_partition_ids=False, **kwargs)


def test_a_handshake_binds_every_partition_its_node_claims():
    # Prepare
    nodes, grid = _sync(), FakeGrid({10: 2, 11: 0, 12: 1})
    # Execute
    bindings = nodes.wait_for_all(grid)
    # Assert
    assert nodes.registry.client_of_node == {10: 2, 11: 0, 12: 1}
    assert sorted((b.node, b.client, b.new) for b in bindings) == [(10, 2, True), (11, 0, True), (12, 1, True)]
    assert sorted(grid.queried) == [10, 11, 12]
    assert nodes.sync(grid) == [] and len(grid.queried) == 3  # bound nodes are not asked again


def test_the_handshake_message_carries_the_query():
    nodes, grid = _sync(query={R.SCENARIO: '{"name": "x"}'}), FakeGrid({10: 0, 11: 1, 12: 2})
    sent = []
    send = grid.send_and_receive
    grid.send_and_receive = lambda msgs, timeout=None: (sent.extend(msgs), send(msgs, timeout))[1]
    nodes.sync(grid)
    assert {m.content[R.CONFIG][R.SCENARIO] for m in sent} == {'{"name": "x"}'}
    assert {m.metadata.message_type for m in sent} == {"query"}


def test_a_malformed_handshake_reply_is_refused_logged_and_never_asked_again(caplog):
    # Prepare: node 13 answers a string partition-id, node 14 a partition outside 0..2.
    claims = {10: 0, 11: 1, 12: 2, 13: RecordDict({R.CONFIG: ConfigRecord({R.PARTITION_ID: "zero"})}), 14: 7}
    nodes, grid = _sync(), FakeGrid(claims)
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        nodes.sync(grid)
        nodes.sync(grid)
    # Assert
    assert nodes.registry.client_of_node == {10: 0, 11: 1, 12: 2} and nodes.refused == {13, 14}
    assert "refused node 13: its handshake reply is malformed: partition-id must be an integer" in caplog.text
    assert "refused node 14: its handshake reply is malformed: partition-id=7 is outside 0..2" in caplog.text
    assert grid.queried.count(13) == 1 and grid.queried.count(14) == 1


def test_a_node_whose_handshake_fails_is_asked_again_and_its_error_logged_once(caplog):
    broken = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="no data in /data/node-2")
    nodes, grid = _sync(), FakeGrid({10: 0, 11: 1, 12: broken})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        nodes.sync(grid)
        nodes.sync(grid)
    assert grid.queried.count(12) == 2 and 12 not in nodes.refused
    assert caplog.text.count("node 12 failed the handshake (asked again): no data in /data/node-2") == 1
    grid.claims[12] = 2  # the node is fixed
    assert [(b.node, b.client) for b in nodes.sync(grid)] == [(12, 2)]


def test_a_wait_that_times_out_names_the_missing_partitions_and_the_handshake_errors():
    # Prepare: partition 1 is claimed by nobody; node 12 fails its handshake every time.
    broken = Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason="cannot load the ClientApp")
    nodes, grid = _sync(wait_timeout=0.3), FakeGrid({10: 0, 12: broken})
    # Execute, Assert
    with pytest.raises(ClientSetupError) as err:
        nodes.wait_for_all(grid)
    text = str(err.value)
    assert "only 1 of num-clients=3 partitions are held by a node after 0 s (2 nodes connected, 0 refused)" in text
    assert "no node holds partitions [1, 2]" in text and "handshake errors: ['cannot load the ClientApp']" in text


def test_the_progress_line_counts_nodes_connected_then_partitions_held(monkeypatch, caplog):
    # Before: "0 of 5 partitions held, 3 nodes connected" while 3 of the 5 nodes were connected.
    monkeypatch.setattr(N, "PROGRESS_EVERY", 0.0)
    monkeypatch.setattr(N, "POLL", 0.01)
    nodes = NodeSync(num_clients=5, handshake=False, wait_timeout=0.1)  # numbered: binds once all 5 are there
    with caplog.at_level(logging.INFO, logger="flwr"), pytest.raises(ClientSetupError):
        nodes.wait_for_all(FakeGrid({10: 0, 11: 0, 12: 0}))
    assert "waiting for nodes: 3 of 5 nodes connected" in caplog.text
    assert "partitions held" not in caplog.text
    bound = _sync(n=5)
    bound.sync(FakeGrid({10: 0, 11: 1, 12: 2}))
    assert bound.progress({10, 11, 12}) == "3 of 5 nodes connected, 3 of 5 partitions held"


def test_without_the_handshake_nodes_are_numbered_and_a_newcomer_takes_a_free_index():
    # Prepare
    nodes, grid = NodeSync(num_clients=3, handshake=False), FakeGrid({30: 0, 10: 0, 20: 0})
    # Execute
    first = nodes.wait_for_all(grid)
    del grid.claims[20]
    grid.claims[5] = 0
    later = nodes.sync(grid)
    # Assert: id order, nobody asked; node 5 takes node 20's index.
    assert sorted((b.node, b.client) for b in first) == [(10, 0), (20, 1), (30, 2)]
    assert [(b.node, b.client) for b in later] == [(5, 1)] and grid.queried == []


def test_without_num_clients_the_nodes_connected_are_counted():
    nodes = NodeSync(num_clients=None, handshake=False, min_available_nodes=2)
    assert nodes.registry is None
    assert nodes.count(FakeGrid({10: 0, 11: 0, 12: 0})) == 3
    assert nodes.registry.num_clients == 3
    with pytest.raises(ClientSetupError, match="only 1 of min_available_nodes=2 nodes connected within 0 s"):
        NodeSync(num_clients=None, handshake=False, wait_timeout=0.2).count(FakeGrid({10: 0}))
    with pytest.raises(ValueError, match="num_clients may be left out only for apps without the partition-id"):
        NodeSync(num_clients=None, handshake=True)
    with pytest.raises(ValueError, match="node_wait_timeout must be > 0 seconds, got 0"):
        NodeSync(num_clients=3, handshake=True, wait_timeout=0)


def test_a_node_leaving_is_forgotten_and_logged(caplog):
    nodes, grid = _sync(), FakeGrid({10: 0, 11: 1, 12: 2})
    nodes.sync(grid)
    del grid.claims[11]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert nodes.sync(grid) == []
    assert nodes.registry.client_of_node == {10: 0, 12: 2}
    assert "node 11 (client 1) left" in caplog.text


def test_with_a_key_map_a_node_holds_only_the_partition_its_authenticated_key_maps_to(caplog):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from fl_clip21.flower.identity import normalise_public_key

    # Prepare: the SuperLink authenticated nodes 10, 11 and 12 with their keys (PEM, as NodeInfo holds them);
    # the key map gives partitions 0 and 1 to the keys of nodes 10 and 11; node 12 claims partition 1 too.
    pem = {nid: ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo) for nid in (10, 11, 12)}
    keys = {normalise_public_key(pem[10]): 0, normalise_public_key(pem[11]): 1}
    nodes = NodeSync(num_clients=2, handshake=True, node_keys=keys, trust_partition_ids=False)
    grid = FakeGrid({10: 0, 12: 1, 11: 1}, keys=pem)
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        bindings = nodes.sync(grid)
    # Assert: nodes 10 and 11 are proven by their keys; node 12's key is not in the map.
    assert sorted((b.node, b.client, b.proven) for b in bindings) == [(10, 0, True), (11, 1, True)]
    assert nodes.refused == {12}
    assert "refused node 12: node 12 claims partition 1 but its public key is not in the key map" in caplog.text


def test_a_stop_request_ends_a_wait_for_nodes_within_one_poll():
    # Before: the wait slept with time.sleep and ran on to its timeout (600 s by default) after SIGINT.
    import threading
    import time

    from fl_clip21.flower import stop

    nodes = NodeSync(num_clients=5, handshake=False, wait_timeout=60.0)
    timer = threading.Timer(0.3, stop.request, args=(2,))
    timer.start()
    begun = time.monotonic()
    try:
        with pytest.raises(stop.RunStopped, match="SIGINT"):
            nodes.wait_for_all(FakeGrid({10: 0}))
    finally:
        timer.cancel()
        stop.reset()
    assert time.monotonic() - begun < 5.0
