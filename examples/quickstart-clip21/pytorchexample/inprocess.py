"""Run a version of the app in this process, on Flower's simulation engine (Ray).

What the tests and ``measure.py`` use instead of ``flwr run``: the ServerApp's
``main`` is called with the run config of ``pyproject.toml`` (and overrides),
so its Result comes back, with the wall-clock time of every round.
"""

from __future__ import annotations

import importlib
import os
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fl_clip21.flower.simulation import simulate_app
from pytorchexample.app import client

APP_DIR = Path(__file__).resolve().parent.parent
VERSIONS = ("fedavg", "clip21")


def run_config(**overrides: Any) -> dict[str, Any]:
    """The run config of ``pyproject.toml`` with ``overrides`` (keys with ``_`` for ``-``)."""
    config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for key, value in overrides.items():
        name = key.replace("_", "-")
        if name not in config:
            raise KeyError(f"run config has no key {name!r} (keys: {', '.join(config)})")
        config[name] = value
    return config


@dataclass(frozen=True)
class Run:
    """One call of a version's ``main``."""

    version: str
    config: dict[str, Any]
    result: Result
    round_seconds: list[float]  # each round: train, client evaluation, central evaluation


def _time_rounds(grid: Grid, starts: list[float]) -> None:
    """Note the time each train round is sent (Strategy.start sends one batch of train messages a round)."""
    send = grid.send_and_receive

    def send_and_receive(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            starts.append(time.perf_counter())
        return send(messages, timeout=timeout)

    # On this object, not a wrapper: the strategies still get Flower's InMemoryGrid (Clip21Strategy checks its type).
    grid.send_and_receive = send_and_receive


@contextmanager
def _importable_in_ray_workers() -> Iterator[None]:
    """Ray's workers unpickle the ClientApp by module name: put this app on their path."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(APP_DIR), *([saved] if saved else [])])
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def simulate(runs: Sequence[tuple[str, Mapping[str, Any]]], num_supernodes: int) -> list[Run]:
    """Run each ``(version, run config)`` ("fedavg" or "clip21"), one after the other, in one simulation.

    The nodes run the ClientApp of ``pytorchexample.app`` (each message goes to
    the version whose strategy sent it), with one CPU each; every node takes part
    in every round.
    """
    servers = {}
    for version, _ in runs:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
        servers[version] = importlib.import_module(f"pytorchexample.{version}.server_app")
    done: list[Run] = []
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        starts: list[float] = []
        _time_rounds(grid, starts)
        for version, config in runs:
            starts.clear()
            ctx = Context(context.run_id, context.node_id, context.node_config, context.state, dict(config))
            result = servers[version].main(grid, ctx)
            end = time.perf_counter()
            done.append(Run(version, dict(config), result, [b - a for a, b in zip(starts, [*starts[1:], end])]))

    with _importable_in_ray_workers():
        simulate_app(app, client, {"num-clients": num_supernodes, "num-cpus": 1.0})
    return done
