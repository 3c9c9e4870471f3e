"""Run a scenario on Flower's simulation engine (Ray backend), in this process."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
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


# ray.init(address="local") starts a new Ray instance, whatever else runs on the machine.
LOCAL_RAY = "local"


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


def resolve_ray_address(address: str | None = None) -> str | None:
    """The Ray cluster to attach to: ``address``, else ``RAY_ADDRESS``; None: a new local instance.

    ``local`` (either way) also means a new local instance.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == LOCAL_RAY else address


def check_ray_address(address: str, source: str, timeout: float = 10.0) -> None:
    """Fail unless something listens at the Ray head's ``host:port``.

    Ray retries an unreachable address forever, and the simulation hangs with it.
    """
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{source} must be host:port of a Ray head (or 'local'), got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(
            f"{source}: no Ray cluster answers at {address!r} ({e}); start one with 'ray start --head' "
            "or give the address of a running one"
        ) from None


def check_cluster_fits(config: dict[str, Any]) -> None:
    """Fail unless some node of the Ray cluster ``config`` attaches to can host one client.

    Otherwise Flower's actor pool is empty and the simulation crashes or hangs.
    A new local instance is checked by :func:`backend_config` without starting Ray.
    """
    import ray

    address = config["init_args"]["address"]
    if address == LOCAL_RAY or ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    finally:
        ray.shutdown()
    need = config["client_resources"]
    if not any(n.get("CPU", 0) >= need["num_cpus"] and n.get("GPU", 0) >= need["num_gpus"] for n in nodes):
        have = "; ".join(f"CPU={n.get('CPU', 0):g} GPU={n.get('GPU', 0):g}" for n in nodes) or "no live node"
        raise ConfigError(
            f"num-cpus={need['num_cpus']:g} num-gpus={need['num_gpus']:g}: no node of the Ray cluster at "
            f"{address!r} can host one client ({have})"
        )


def backend_config(cfg: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    """Ray settings: client resources from the scenario, and which Ray to use.

    With an address (``address`` or ``RAY_ADDRESS``, see :func:`resolve_ray_address`)
    Ray attaches to that cluster and its resources; without one, Ray gets
    ``address="local"``, a new instance with this machine's CPUs. Plain
    ``ray.init()`` would attach to the last cluster ``ray start`` recorded in
    Ray's temp folder (``ray_current_cluster``), someone else's or a dead one.
    Raises :class:`ConfigError` when ``num-gpus`` > 0 on a machine without a GPU
    or ``num-cpus`` above its CPUs (new local instance), or when nothing answers
    at the address (see also :func:`check_cluster_fits`).
    """
    source = "--ray-address" if address else "RAY_ADDRESS"
    address = resolve_ray_address(address)
    num_gpus = cfg.get("num-gpus", 0.0)
    init_args: dict[str, Any] = {"include_dashboard": False}
    if address is None:
        cpus = os.cpu_count() or 1
        if cfg["num-cpus"] > cpus:
            raise ConfigError(f"num-cpus must be <= the {cpus} CPUs of this machine, got {cfg['num-cpus']!r}")
        check_gpus(num_gpus)
        init_args.update(address=LOCAL_RAY, num_cpus=cpus)
    else:
        check_ray_address(address, source)
        init_args["address"] = address
    return {
        "client_resources": {"num_cpus": cfg["num-cpus"], "num_gpus": num_gpus},
        "init_args": init_args,
    }


def simulate_app(
    server_app: ServerApp,
    client_app: ClientApp,
    cfg: dict[str, Any],
    verbose: bool = False,
    ray_address: str | None = None,
) -> None:
    """Run ``server_app`` with ``cfg['num-clients']`` simulated nodes of ``client_app`` (Ray).

    ``ray_address``: the Ray cluster to run on (see :func:`backend_config`).
    """
    config = backend_config(cfg, ray_address)
    check_cluster_fits(config)
    from flwr.simulation import run_simulation
    from threadpoolctl import threadpool_limits

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    drop = _DropDeprecation()
    flwr_logger.addFilter(drop)
    try:
        # One BLAS thread in the driver: the cores belong to the Ray workers, and
        # OpenBLAS's spinning threads, called from the ServerApp's thread while the
        # workers run, were seen to take minutes over a 20000 x 15 matrix product.
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg["num-clients"],
                backend_config=config,
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
    ray_address: str | None = None,
):
    """Run every algorithm of ``cfg`` in one Flower simulation; return their results.

    ``cfg`` may be a list of configs (a grid over seeds or epsilons, with the
    same clients): they run one after the other in the same simulation, and a
    list of results comes back. ``client_app`` replaces the standard ClientApp
    (e.g. one with fault mods). ``checkpoint_dirs`` (one per config) make
    every algorithm checkpoint each round and resume from an existing checkpoint.
    ``ray_address`` attaches to an existing Ray cluster (default: ``RAY_ADDRESS``,
    else a new local Ray instance).
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
        simulate_app(server_app, client_app or make_client_app(), cfgs[0], verbose, ray_address)
    except Exception as e:
        if not errors:
            raise
        raise SimulationError(f"the simulation stopped: {errors[0]!r}") from e
    if errors:
        raise SimulationError(f"the simulation stopped: {errors[0]!r}") from errors[0]
    if len(results) != len(cfgs) or any(set(r) != set(c["algorithms"]) for r, c in zip(results, cfgs)):
        raise SimulationError("the simulation ended without results for every algorithm")
    return results if isinstance(cfg, list) else results[0]
