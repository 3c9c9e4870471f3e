"""The components ``flwr run`` loads: both versions of the app behind one pyproject.

``pytorchexample.fedavg`` is Flower's quickstart as it is, ``pytorchexample.clip21``
the converted app. Run config ``strategy`` picks the ServerApp; each message
goes to the ClientApp of the strategy that sent it. A user converting their
own app changes its two modules in place and needs none of this.
"""

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fl_clip21.flower import records
from pytorchexample.clip21 import client_app as clip21_client
from pytorchexample.clip21 import server_app as clip21_server
from pytorchexample.fedavg import client_app as fedavg_client
from pytorchexample.fedavg import server_app as fedavg_server

SERVER_APPS = {"fedavg": fedavg_server.app, "clip21": clip21_server.app}

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    name = context.run_config.get("strategy")
    if name not in SERVER_APPS:
        raise ValueError(f"run config strategy must be one of {', '.join(map(repr, SERVER_APPS))}, got {name!r}")
    SERVER_APPS[name](grid, context)


def client_app_for(msg: Message) -> ClientApp:
    """The Clip21 ClientApp for Clip21Strategy's train messages (they carry tau), else the FedAvg one.

    Routed by the message, not by the run config: Flower's in-process
    simulation gives the nodes an empty run config.
    """
    configs = msg.content.config_records.values()
    clip21 = msg.metadata.message_type == MessageType.TRAIN and any(records.TAU in c for c in configs)
    return clip21_client.app if clip21 else fedavg_client.app


@client.train()
def train(msg: Message, context: Context) -> Message:
    return client_app_for(msg)(msg, context)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client_app_for(msg)(msg, context)
