"""ServerApps of the worked example: FedAvg, and the same run with Clip21Strategy.

The only server-side change is the strategy (see README).
"""

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from clients.digits_example import make_model
from fl_clip21.algorithms import make_algorithm
from fl_clip21.flower.strategy import Clip21Strategy

ROUNDS = 10
TRAIN_CONFIG = ConfigRecord({"lr": 0.1, "local-epochs": 1})


def plain_main(grid: Grid, context: Context, num_nodes: int = 5):
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=num_nodes)
    return strategy.start(
        grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()), num_rounds=ROUNDS,
        train_config=TRAIN_CONFIG,
    )


def clip21_main(grid: Grid, context: Context, num_nodes: int = 5, tau: float = 0.1, audit: bool = False):
    strategy = Clip21Strategy(
        algorithm=make_algorithm("clip21-gd", lr=1.0, tau=tau), scenario=None, num_clients=num_nodes,
        fraction_evaluate=1.0, audit=audit,
    )
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()), num_rounds=ROUNDS,
        train_config=TRAIN_CONFIG,
    )
    return result, strategy


plain_server = ServerApp()
plain_server.main()(plain_main)
clip21_server = ServerApp()
clip21_server.main()(clip21_main)
