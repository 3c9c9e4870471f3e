"""``flower-dp-fixed``: Flower's own client-side clipping, as Flower users run it.

Server: Flower's ``FedAvg`` wrapped in ``DifferentialPrivacyClientSideFixedClipping``.
Client: plain local training (``local-steps`` minibatch SGD steps of size
``lr``) under Flower's ``fixedclipping_mod``, which clips the model update.

It is driven by the same scenario keys as the other algorithms:

- clipping norm ``C = lr * tau``: with one local step the clipped update is
  ``lr * clip_tau(grad)``, the same step as ``clip-sgd``;
- noise multiplier ``z = sigma / (2 tau)``, the z the local-DP algorithms get for
  the same ``sigma`` (and so for the same ``target-epsilon``). Flower adds
  ``N(0, (z C / m)^2)`` once, to the average of the m sampled updates, on the
  server: this is central DP (add/remove one client, the server is trusted),
  a weaker trust model than the local DP of clip-sgd and clip21-sgd2m, whose
  every message is noised before it leaves the client. Its ``epsilon`` is the
  same accountant at multiplier z under that adjacency.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from fl_clip21 import core
from fl_clip21.config import with_node_config
from fl_clip21.engine import evaluate
from fl_clip21.flower import records as R
from fl_clip21.flower.client import partition_of
from fl_clip21.privacy import epsilon
from fl_clip21.flower.records import quiet_flower
from fl_clip21.flower.validation import payload_bytes
from fl_clip21.problems import Minibatch, build_problem

NAME = "flower-dp-fixed"


def is_flower_message(msg: Message) -> bool:
    """A train message from a Flower strategy rather than from Clip21Strategy."""
    config = R.get_record(msg.content, R.CONFIG, ConfigRecord)
    return config is None or R.ALGORITHM not in config


def local_training(msg: Message, context: Context) -> Message:
    """Plain Flower client training: ``local-steps`` SGD steps from the received model."""
    config = msg.content[R.CONFIG]
    cfg = with_node_config(json.loads(str(config[R.SCENARIO])), context.node_config)
    problem = build_problem(cfg)
    i = partition_of(context)
    server_round = int(config.get(R.ROUND, 0))
    params = R.from_record(msg.content[R.ARRAYS])
    for step in range(cfg["local-steps"]):
        minibatch = Minibatch(cfg["seed"], server_round, cfg["batch-size"], step)
        params = core.add(params, problem.client_grad(i, params, minibatch), -cfg["lr"])
    return Message(
        RecordDict({R.ARRAYS: R.to_record(params), R.METRICS: MetricRecord({"num-examples": 1})}),
        reply_to=msg,
    )


def flower_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` for Flower's messages; Clip21's pass through."""
    if is_flower_message(msg):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


class _CountingFedAvg(FedAvg):
    """FedAvg that also records the replies it aggregates (for metrics.json)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        self.last = {
            "participants": len(replies),
            "accepted": len(ok),
            "failed": len(replies) - len(ok),
            "rejected": 0,
            "bytes_up": sum(payload_bytes(r.content.get(R.ARRAYS)) for r in ok),
        }
        return super().aggregate_train(server_round, ok)


def run_flower_dp(grid: Grid, cfg: dict[str, Any], on_round=None, timeout: float = 3600.0) -> dict[str, Any]:
    """Run Flower's DP FedAvg for ``cfg['rounds']`` rounds; the same records as the other algorithms."""
    problem = build_problem(cfg)
    n = cfg["num-clients"]
    m = max(1, int(round(cfg["fraction"] * n))) if cfg["fraction"] < 1 else n
    z = cfg["sigma"] / (2 * cfg["tau"])
    with quiet_flower():  # FedAvg warns that fraction_evaluate=0 skips client evaluation
        fedavg = _CountingFedAvg(
            fraction_train=m / n, fraction_evaluate=0.0, min_train_nodes=m, min_available_nodes=n
        )
    strategy = DifferentialPrivacyClientSideFixedClipping(
        fedavg, noise_multiplier=z, clipping_norm=cfg["lr"] * cfg["tau"], num_sampled_clients=m
    )
    records: list[dict[str, Any]] = []
    state = {"t0": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            state["t0"] = time.perf_counter()
            return None
        rec = {"round": server_round, **fedavg.last, "seconds": time.perf_counter() - state["t0"]}
        rec.update(evaluate(problem, R.from_record(arrays)))
        if z > 0:
            # Flower samples without a seed: any client may have been in every round.
            rec["epsilon"] = epsilon(z, server_round, cfg["delta"])
        records.append(rec)
        if on_round is not None:
            on_round(NAME, rec, cfg["rounds"])
        state["t0"] = time.perf_counter()
        return MetricRecord({k: v for k, v in rec.items() if k != "round"})

    start = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=R.to_record(problem.init_params()),
        num_rounds=cfg["rounds"],
        timeout=timeout,
        train_config=ConfigRecord({R.SCENARIO: json.dumps(cfg, sort_keys=True)}),
        evaluate_fn=evaluate_fn,
    )
    return {
        "records": records,
        "params": R.from_record(result.arrays),
        "wall_seconds": time.perf_counter() - start,
    }
