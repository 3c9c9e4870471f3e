"""clip21_mod and Clip21Strategy in a plain Flower PyTorch app (the README's worked example)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import ServerApp

from clients.digits_example import clip21_app, plain_app, train
from fl_clip21.flower import records as R
from fl_clip21.flower.mod import NOT_CLIP21, clip21_mod
from fl_clip21.flower.simulation import simulate_app
from server import digits_example

ROOT = Path(__file__).resolve().parent.parent
SIM = {"num-clients": 5, "num-cpus": 1.0}


def _run(server_main, client_app, **kw):
    out = {}
    app = ServerApp()

    @app.main()
    def _main(grid, context):
        out["result"] = server_main(grid, context, **kw)

    simulate_app(app, client_app, SIM)
    return out["result"]


@pytest.mark.slow  # the converted quickstart app: tests/test_example.py
def test_plain_app_becomes_clip21_with_the_mod_and_the_strategy():
    plain = _run(digits_example.plain_main, plain_app)
    result, strategy = _run(digits_example.clip21_main, clip21_app, audit=True)
    plain_acc = plain.evaluate_metrics_clientapp[digits_example.ROUNDS]["accuracy"]
    clip21_acc = result.evaluate_metrics_clientapp[digits_example.ROUNDS]["accuracy"]
    assert plain_acc > 0.75 and clip21_acc > 0.7, (plain_acc, clip21_acc)  # from 0.1 at round 0
    recs = strategy.history
    assert recs[0]["clip_fraction"] == 1.0 and all(r["rejected"] == 0 for r in recs)
    # float32 model: g and the clients' v_i agree up to float32 rounding
    assert max(r["invariant_gap"] for r in recs) < 1e-5
    # a torch state_dict of several arrays of mixed shapes went through unchanged in layout
    assert {k: v.shape for k, v in strategy.params.items()} == {
        "0.weight": (32, 64), "0.bias": (32,), "2.weight": (10, 32), "2.bias": (10,)
    }


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 5}, state=RecordDict(), run_config={})


def test_mod_without_its_keys_replies_mod_failed_precondition(flower_task):
    from clients.digits_example import make_model

    arrays = ArrayRecord(make_model().state_dict())
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1, "local-epochs": 1, "server-round": 1})}),
        dst_node_id=7, message_type=MessageType.TRAIN,
    )
    reply = clip21_mod(msg, _context(), train)
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "Clip21Strategy" in reply.error.reason


def test_mod_sends_only_the_clipped_increment_and_commits_v_with_its_round(flower_task):
    from clients.digits_example import make_model

    arrays = ArrayRecord(make_model().state_dict())
    cfg = ConfigRecord({"lr": 0.5, "local-epochs": 1, "server-round": 1, "fl_clip21.tau": 0.01, "fl_clip21.ack": 0,
                        R.SESSION: "s1"})
    msg = Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=7, message_type=MessageType.TRAIN)
    ctx = _context()
    reply = clip21_mod(msg, ctx, train)
    assert not reply.has_error()
    c = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert set(c) == set(arrays.keys())
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in c.values()))
    assert abs(norm - 0.01) < 1e-6  # clipped to tau
    assert reply.content["fl_clip21.reply"]["clipped"] == 1
    assert dict(reply.content["metrics"]) == {"num-examples": 360}  # the app's record, as the app wrote it
    (key,) = [k for k in ctx.state if k.endswith(".v")]  # the client keeps one copy of its memory
    record = ctx.state[key]
    v = np.frombuffer(record["data"], dtype=np.float32)  # the memory: one flat vector, the model's entries in order
    np.testing.assert_array_equal(v, np.concatenate([c[k].ravel() for k in arrays.keys()]))  # v = 0 + c
    assert record["fl_clip21.memory-round"] == 1


def test_the_mod_under_flowers_fedavg_says_once_per_node_that_the_server_is_not_clip21():
    # Execute: FedAvg (3 rounds) with clip21_mod on the nodes, a real simulation in a fresh process,
    # with Ray's merging of similar log lines off so that each node's line shows.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fedavg_with_mod.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Assert: every reply of every round is the error that names the fix; nothing was trained unclipped
    assert len(out["nodes"]) == 3 and set(out["errors"]) == {"1", "2", "3"}
    for reasons in out["errors"].values():
        assert reasons == [NOT_CLIP21] * 3
    assert "Clip21Strategy in the ServerApp" in NOT_CLIP21
    # and each node said so once in the run, not once a round
    warned = [int(n) for n in re.findall(r"node (\d+): clip21_mod: .*\(shown once per node and run\)", proc.stderr)]
    assert sorted(warned) == out["nodes"], proc.stderr[-3000:]


def test_the_warning_is_logged_once_per_node_state(flower_task, caplog):
    msg = Message(RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    ctx = _context()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        replies = [clip21_mod(msg, ctx, train) for _ in range(3)]
        clip21_mod(msg, _context(), train)  # another run (a new context): said again
    assert [r.error.reason for r in replies] == [NOT_CLIP21] * 3
    assert [r.getMessage() for r in caplog.records].count(f"node 7: {NOT_CLIP21} (shown once per node and run)") == 2
