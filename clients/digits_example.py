"""A plain Flower PyTorch app (local SGD on digits), and the same app as a Clip21 client.

The only client-side change is ``mods=[clip21_mod]`` on the train handler
(see README, "Adding Clip21 to an existing Flower app").
"""

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_digits

from fl_clip21.flower.mod import clip21_mod


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def load_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = load_digits(return_X_y=True)
    rows = np.array_split(np.random.default_rng(0).permutation(len(y)), num_partitions)[partition_id]
    return torch.tensor(X[rows] / 16.0, dtype=torch.float32), torch.tensor(y[rows])


def _setup(msg: Message, context: Context):
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    X, y = load_partition(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    return model, X, y


def train(msg: Message, context: Context) -> Message:
    model, X, y = _setup(msg, context)
    config = msg.content["config"]
    opt = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    gen = torch.Generator().manual_seed(int(config["server-round"]) * 1000 + int(context.node_config["partition-id"]))
    for _ in range(int(config["local-epochs"])):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})}
    )
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    model, X, y = _setup(msg, context)
    with torch.no_grad():
        logits = model(X)
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    metrics = MetricRecord({"loss": loss, "accuracy": acc, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


# The plain Flower app.
plain_app = ClientApp()
plain_app.train()(train)
plain_app.evaluate()(evaluate)

# The same app as a Clip21 client: one mod on the train handler.
clip21_app = ClientApp()
clip21_app.train(mods=[clip21_mod])(train)
clip21_app.evaluate()(evaluate)
