"""pytorchexample: the ClientApp."""

from fl_clip21.flower.mod import clip21_mod
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pytorchexample.task import Net, load_data
from pytorchexample.task import test as test_fn
from pytorchexample.task import train as train_fn

app = ClientApp()


@app.train(mods=[clip21_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition; reply with the trained model."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    trainloader, _ = load_data(
        context.node_config["partition-id"], context.node_config["num-partitions"], config["batch-size"],
        shuffle_seed=(config["seed"], config["server-round"]),
    )
    train_loss = train_fn(model, trainloader, config["local-epochs"], config["lr"])
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainloader.dataset)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's test split."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, testloader = load_data(
        context.node_config["partition-id"], context.node_config["num-partitions"], msg.content["config"]["batch-size"]
    )
    eval_loss, eval_acc = test_fn(model, testloader)
    metrics = MetricRecord({"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(testloader.dataset)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
