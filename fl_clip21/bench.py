"""``fl-clip21 bench``: seconds per round of the Flower engine, ours vs Flower's FedAvg.

Both strategies run in the same simulation (the same Ray actors, the same
nodes), on the same problem, alternately, so the machine's noise hits both
alike. FedAvg's clients take one local gradient step (x - lr * grad f_i),
which is exactly one gradient per client per round, as Clip21-GD does.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl_clip21 import core
from fl_clip21.algorithms import algorithm_from_config
from fl_clip21.config import load_scenario, parse_sets
from fl_clip21.flower import records as R
from fl_clip21.flower.client import partition_of, query
from fl_clip21.flower.records import quiet_flower
from fl_clip21.flower.client import train as clip21_train
from fl_clip21.flower.strategy import Clip21Strategy
from fl_clip21.problems import build_problem

DEFAULT_SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "logreg-nonconvex.toml"


def fedavg_train(msg: Message, context: Context) -> Message:
    """FedAvg's client: one local gradient step from the received model."""
    config = msg.content[R.CONFIG]
    cfg = json.loads(str(config[R.SCENARIO]))
    problem = build_problem(cfg)
    i = partition_of(context)
    params = R.from_record(msg.content[R.ARRAYS])
    new = core.add(params, problem.client_grad(i, params), -cfg["lr"])
    return Message(
        RecordDict({R.ARRAYS: R.to_record(new), R.METRICS: MetricRecord({"num-examples": 1})}),
        reply_to=msg,
    )


def _bench_train(msg: Message, context: Context) -> Message:
    if R.ALGORITHM in msg.content[R.CONFIG]:
        return clip21_train(msg, context)
    return fedavg_train(msg, context)


def bench_client_app() -> ClientApp:
    app = ClientApp()
    app.train()(_bench_train)
    app.query()(query)
    return app


def _time_rounds(strategy, grid: Grid, cfg: dict, rounds: int, train_config: ConfigRecord | None) -> float:
    problem = build_problem(cfg)
    t0 = time.perf_counter()
    strategy.start(
        grid=grid, initial_arrays=R.to_record(problem.init_params()), num_rounds=rounds,
        train_config=train_config,
    )
    return (time.perf_counter() - t0) / rounds


def bench_clients(cfg: dict[str, Any], rounds: int, repeats: int) -> dict[str, Any]:
    """Seconds per round of clip21-gd and FedAvg at ``cfg['num-clients']`` clients."""
    from fl_clip21.flower.simulation import fast_polling, simulate_app

    n = cfg["num-clients"]
    times: dict[str, list[float]] = {"fedavg": [], "clip21-gd": []}
    handshake: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        fast_polling(grid)
        scenario = ConfigRecord({R.SCENARIO: json.dumps(cfg, sort_keys=True)})

        def fedavg():
            with quiet_flower():  # FedAvg warns that fraction_evaluate=0 skips evaluation
                return FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)

        mapping: dict[int, int] = {}

        def clip21():
            return Clip21Strategy(
                algorithm=algorithm_from_config("clip21-gd", cfg), scenario=cfg, num_clients=n,
                client_of_node=mapping,
            )

        # Warm-up: Ray actors, imports, the problem cache on every actor; the
        # handshake (once per run) is timed apart from the rounds.
        _time_rounds(fedavg(), grid, cfg, 2, scenario)
        first = clip21()
        t0 = time.perf_counter()
        first.handshake(grid)
        handshake.append(time.perf_counter() - t0)
        mapping.update(first.client_of_node)
        _time_rounds(first, grid, cfg, 2, None)
        for _ in range(repeats):
            times["fedavg"].append(_time_rounds(fedavg(), grid, cfg, rounds, scenario))
            times["clip21-gd"].append(_time_rounds(clip21(), grid, cfg, rounds, None))

    simulate_app(server_app, bench_client_app(), cfg)
    fedavg_s = statistics.median(times["fedavg"])
    clip21_s = statistics.median(times["clip21-gd"])
    return {
        "clients": n,
        "rounds": rounds,
        "repeats": repeats,
        "fedavg_seconds_per_round": fedavg_s,
        "clip21_seconds_per_round": clip21_s,
        "ratio": clip21_s / fedavg_s,
        "clip21_client_rounds_per_second": n / clip21_s,
        "fedavg_client_rounds_per_second": n / fedavg_s,
        "handshake_seconds": handshake[0],
        "all_seconds_per_round": times,
    }


def run_bench(
    clients: list[int], rounds: int, repeats: int, scenario: Path = DEFAULT_SCENARIO,
    out: Path | None = None,
) -> dict[str, Any]:
    """Benchmark every client count; print a table; write JSON to ``out``."""
    rows = []
    for n in clients:
        cfg = load_scenario(scenario, parse_sets([f"num-clients={n}"]))
        row = bench_clients(cfg, rounds, repeats)
        rows.append(row)
        print(
            f"{n:>6} clients: clip21-gd {row['clip21_seconds_per_round']:.3f} s/round, "
            f"FedAvg {row['fedavg_seconds_per_round']:.3f} s/round, ratio {row['ratio']:.3f}",
            flush=True,
        )
    result = {
        "scenario": str(scenario),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "results": rows,
    }
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1))
    return result
