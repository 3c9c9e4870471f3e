"""Run a scenario on Flower's simulation engine (Ray backend), in this process."""

from __future__ import annotations

import logging
import os
from pathlib import Path
import warnings
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fl_clip21.config import ConfigError
from fl_clip21.flower.client import make_client_app
from fl_clip21.flower.server import OnRound, run_scenario


# Flower's in-memory grid sleeps this long between polls for replies (0.1 s by
# default): at 10 clients that sleep, not the clients' work, sets a round's length.
PULL_INTERVAL = 0.005


def fast_polling(grid: Grid) -> None:
    """Poll the simulation's in-memory grid every PULL_INTERVAL seconds."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = PULL_INTERVAL


class _DropDeprecation(logging.Filter):
    """We call ``run_simulation`` on purpose (in-process results); drop its notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


class SimulationError(RuntimeError):
    """The ServerApp of a simulation did not finish."""


def check_gpus(num_gpus: float) -> None:
    """Fail if clients ask for GPUs this machine does not have.

    Ray would accept the request and wait for a GPU that never comes.
    """
    if num_gpus > 0:
        import torch

        if torch.cuda.device_count() == 0:
            raise ConfigError(
                f"num-gpus must be 0 on this machine (no GPU: torch.cuda.device_count() == 0), got {num_gpus!r}"
            )


def backend_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray settings from the scenario: client resources, the local CPUs.

    Raises :class:`ConfigError` when ``num-gpus`` > 0 on a machine without a GPU.
    """
    num_gpus = cfg.get("num-gpus", 0.0)
    init_args: dict[str, Any] = {"include_dashboard": False}
    if "RAY_ADDRESS" not in os.environ:
        check_gpus(num_gpus)
        init_args["num_cpus"] = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cfg["num-cpus"], "num_gpus": num_gpus},
        "init_args": init_args,
    }


def simulate_app(server_app: ServerApp, client_app: ClientApp, cfg: dict[str, Any], verbose: bool = False) -> None:
    """Run ``server_app`` with ``cfg['num-clients']`` simulated nodes of ``client_app`` (Ray)."""
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    drop = _DropDeprecation()
    flwr_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg["num-clients"],
                backend_config=backend_config(cfg),
                verbose_logging=verbose,
            )
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(drop)


def simulate(
    cfg: dict[str, Any] | list[dict[str, Any]],
    on_round: OnRound | None = None,
    verbose: bool = False,
    client_app: ClientApp | None = None,
    checkpoint_dirs: list[Path] | None = None,
):
    """Run every algorithm of ``cfg`` in one Flower simulation; return their results.

    ``cfg`` may be a list of configs (a grid over seeds or epsilons, with the
    same clients): they run one after the other in the same simulation, and a
    list of results comes back. ``client_app`` replaces the standard ClientApp
    (e.g. one with fault mods). ``checkpoint_dirs`` (one per config) make
    every algorithm checkpoint each round and resume from an existing checkpoint.
    """
    cfgs = cfg if isinstance(cfg, list) else [cfg]
    results: list[dict[str, dict]] = []
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        fast_polling(grid)
        try:
            for j, c in enumerate(cfgs):
                ckpt = checkpoint_dirs[j] if checkpoint_dirs is not None else None
                results.append(run_scenario(grid, c, on_round, ckpt))
        except BaseException as e:
            errors.append(e)
            raise

    try:
        simulate_app(server_app, client_app or make_client_app(), cfgs[0], verbose)
    except Exception as e:
        if not errors:
            raise
        raise SimulationError(f"the simulation stopped: {errors[0]!r}") from e
    if errors:
        raise SimulationError(f"the simulation stopped: {errors[0]!r}") from errors[0]
    if len(results) != len(cfgs) or any(set(r) != set(c["algorithms"]) for r, c in zip(results, cfgs)):
        raise SimulationError("the simulation ended without results for every algorithm")
    return results if isinstance(cfg, list) else results[0]
