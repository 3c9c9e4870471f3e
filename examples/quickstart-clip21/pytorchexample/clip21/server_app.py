"""pytorchexample: the ServerApp."""

import torch
from fl_clip21.algorithms import make_algorithm
from fl_clip21.flower.strategy import Clip21Strategy
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from pytorchexample.task import Net, load_centralized_dataset, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> Result:
    """Run the rounds; the Result goes back to an in-process caller (Flower ignores it)."""
    num_rounds: int = context.run_config["num-server-rounds"]
    fraction_evaluate: float = context.run_config["fraction-evaluate"]
    batch_size: int = context.run_config["batch-size"]
    tau: float = context.run_config["tau"]
    train_config = ConfigRecord({
        "lr": context.run_config["learning-rate"], "local-epochs": context.run_config["local-epochs"],
        "batch-size": batch_size, "seed": context.run_config["seed"],
    })

    torch.manual_seed(context.run_config["seed"])
    arrays = ArrayRecord(Net().state_dict())

    strategy = Clip21Strategy(
        algorithm=make_algorithm("clip21-gd", lr=1.0, tau=tau), scenario=None, num_clients=None,
        fraction_evaluate=fraction_evaluate,
    )

    return strategy.start(
        grid=grid, initial_arrays=arrays, num_rounds=num_rounds, train_config=train_config,
        evaluate_config=ConfigRecord({"batch-size": batch_size}), evaluate_fn=global_evaluate,
    )


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Loss and accuracy of the global model on the server's test set."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, load_centralized_dataset())
    return MetricRecord({"accuracy": accuracy, "loss": loss})
