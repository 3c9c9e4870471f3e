"""Run a scenario on Flower's simulation engine (Ray backend), in this process."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fl_clip21.config import ConfigError
from fl_clip21.flower import stop
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


class _Silence(logging.Filter):
    """Drop every record (Flower's log once a second signal stops the run at once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A stopped ServerApp ends the simulation once the messages the clients are
# working on come back; past this many seconds, say why the run has not ended.
STOP_NOTICE_S = 3.0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], None]]:
    """While in the block, SIGINT and SIGTERM stop the run (:mod:`fl_clip21.flower.stop`) instead of the process.

    Python's default turns SIGINT into a KeyboardInterrupt wherever the main
    thread happens to be, and the ServerApp's thread waits on: the process
    never exits. Here the first signal sets the stop flag; the ServerApp raises
    :class:`~fl_clip21.flower.stop.RunStopped` at its next grid call (or wait),
    Flower stops its runtime and shuts Ray down, and the simulation raises
    RunStopped. A second signal raises :class:`~fl_clip21.flower.stop.StopNow`
    in the main thread at once.

    The block gets a function that installs the handlers again: ``ray.init``
    replaces SIGTERM's (with one that exits mid-way, and a C++ one that aborts).
    On leaving, the handlers from before the block come back. Only in the main
    thread (where Python delivers signals); elsewhere nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    done = threading.Event()

    def notice() -> None:
        if not done.wait(STOP_NOTICE_S):
            log(WARNING, "fl-clip21: stopping: the clients' work in progress finishes first (a second signal stops at once)")

    silence = _Silence()

    def on_signal(signum: int, frame: object) -> None:
        if stop.requested():
            # What Flower's threads log next (the actors' deaths, with tracebacks) is this stop, not news.
            logging.getLogger("flwr").addFilter(silence)
            raise stop.StopNow(signum)
        stop.request(signum)
        threading.Thread(target=notice, daemon=True).start()

    def install() -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, on_signal)

    stop.reset()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    install()
    try:
        yield install
    finally:
        done.set()
        logging.getLogger("flwr").removeFilter(silence)
        for s, handler in previous.items():
            signal.signal(s, handler)


def init_ray(config: dict[str, Any], verbose: bool) -> None:
    """Start (or attach to) Ray as Flower's RayBackend would, so that Flower finds it running.

    The same arguments as Flower's ``RayBackend.init_ray`` and its defaults
    (``run_simulation`` without ``verbose_logging``: Ray's log at WARNING, the
    workers' output to this process), and the driver's ``sys.path`` to the
    workers. Done here, in the main thread, so that the signal handlers can be
    installed again after ``ray.init`` (:func:`stop_on_signals`).
    """
    import ray
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    if ray.is_initialized():
        return
    args: dict[str, Any] = {"include_dashboard": False}
    if not verbose:
        args.update(
            logging_level=DEFAULT_SIMULATION_CONFIG.init_args_logging_level,
            log_to_driver=DEFAULT_SIMULATION_CONFIG.init_args_log_to_driver,
        )
    args.update(config["init_args"])
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)


def stoppable_app(server_app: ServerApp) -> ServerApp:
    """``server_app`` on a grid whose calls raise RunStopped once a stop is asked for (:func:`stop.stoppable`)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        stop.check()
        server_app(stop.stoppable(grid), context)

    return app


def simulate_app(
    server_app: ServerApp,
    client_app: ClientApp,
    cfg: dict[str, Any],
    verbose: bool = False,
    ray_address: str | None = None,
) -> None:
    """Run ``server_app`` with ``cfg['num-clients']`` simulated nodes of ``client_app`` (Ray).

    ``ray_address``: the Ray cluster to run on (see :func:`backend_config`).
    SIGINT and SIGTERM stop the run (:func:`stop_on_signals`): Ray is shut
    down and :class:`~fl_clip21.flower.stop.RunStopped` raised.
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
        with warnings.catch_warnings(), threadpool_limits(limits=1), stop_on_signals() as reinstall:
            warnings.simplefilter("ignore")
            init_ray(config, verbose)
            reinstall()
            run_simulation(
                server_app=stoppable_app(server_app),
                client_app=client_app,
                num_supernodes=cfg["num-clients"],
                backend_config=config,
                verbose_logging=verbose,
            )
            stop.check()  # a signal after the ServerApp's last grid call still stops the run
    finally:
        import ray

        if ray.is_initialized():  # Flower shuts Ray down when its runtime ends; not when it never started
            ray.shutdown()
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
    except stop.RunStopped:
        raise
    except Exception as e:
        if not errors:
            raise
        raise SimulationError(f"the simulation stopped: {errors[0]!r}") from e
    if errors:
        raise SimulationError(f"the simulation stopped: {errors[0]!r}") from errors[0]
    if len(results) != len(cfgs) or any(set(r) != set(c["algorithms"]) for r, c in zip(results, cfgs)):
        raise SimulationError("the simulation ended without results for every algorithm")
    return results if isinstance(cfg, list) else results[0]
