"""Flower's FedAvg with a ClientApp that uses clip21_mod, in a real simulation (run by tests/test_mod.py).

Prints one JSON line: the nodes FedAvg sent train messages to, and per round
the error reasons of the replies it got. The nodes log through Ray, which
forwards their lines to this process's stderr a moment later: the ServerApp
waits (at most WAIT_S) until it has seen the mod's warning of every node, so
that the test reads them all.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time

from flwr.app import ArrayRecord
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from clients.digits_example import clip21_app, make_model
from fl_clip21.flower.simulation import simulate_app
from server.digits_example import TRAIN_CONFIG

NODES, ROUNDS, WAIT_S = 3, 3, 30.0
WARNING = re.compile(r"node (\d+): clip21_mod: .* \(shown once per node and run\)")


class _Tee:
    """sys.stderr that also notes the nodes whose warning went through it."""

    def __init__(self, stream) -> None:
        self.stream, self.nodes, self.lock = stream, set(), threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.nodes.update(int(m) for m in WARNING.findall(text))
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class _Recording(FedAvg):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sent: set[int] = set()
        self.errors: dict[int, list[str]] = {}

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent.update(m.metadata.dst_node_id for m in messages)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.errors[server_round] = [r.error.reason if r.has_error() else "" for r in replies]
        return super().aggregate_train(server_round, replies)


def main() -> None:
    tee = sys.stderr = _Tee(sys.stderr)
    # min_train_nodes: FedAvg counts the nodes for fraction_train before they all registered
    strategy = _Recording(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NODES, min_train_nodes=NODES)
    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()), num_rounds=ROUNDS,
            train_config=TRAIN_CONFIG,
        )
        deadline = time.monotonic() + WAIT_S
        while tee.nodes < strategy.sent and time.monotonic() < deadline:
            time.sleep(0.1)

    simulate_app(app, clip21_app, {"num-clients": NODES, "num-cpus": 1.0})
    print(json.dumps({"nodes": sorted(strategy.sent), "errors": strategy.errors}), flush=True)


if __name__ == "__main__":
    main()
