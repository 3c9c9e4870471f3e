"""``fl-clip21 bench``: the Flower engine's cost, ours vs Flower's FedAvg, and the vectorized engine.

For every client count, in one Flower simulation, both strategies run on the
same problem (the same Ray actors, the same nodes), alternately, so the
machine's noise hits both alike. FedAvg's clients take one local gradient step
(x - lr * grad f_i), which is exactly one gradient per client per round, as
Clip21-GD does. The same run measures the bytes of one message each way, the
driver's memory, and the vectorized engine on the same rounds. At the largest
client count it also runs a long clip21-gd run recording the driver's memory
after every round (is it flat?), and measures the memory clip21-gd adds per
client on a problem whose model is large enough to see it
(``scenarios/bench/memory.toml``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fl_clip21 import core
from fl_clip21.algorithms import algorithm_from_config, model_size
from fl_clip21.config import load_scenario, parse_sets
from fl_clip21.flower import records as R
from fl_clip21.flower.client import partition_of, query, run_setup
from fl_clip21.flower.records import quiet_flower
from fl_clip21.flower.client import train as clip21_train
from fl_clip21.flower.strategy import Clip21Strategy
from fl_clip21.problems import build_problem

BENCH_DIR = Path(__file__).resolve().parent.parent / "scenarios" / "bench"
DEFAULT_SCENARIO = BENCH_DIR / "logreg-nonconvex.toml"
MEMORY_SCENARIO = BENCH_DIR / "memory.toml"
MB = 2**20


def fedavg_train(msg: Message, context: Context) -> Message:
    """FedAvg's client: one local gradient step from the received model.

    It reads the scenario as fl-clip21's client does (parsed once per process).
    """
    cfg, _, problem = run_setup(str(msg.content[R.CONFIG][R.SCENARIO]), "gd")
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


# --- memory -----------------------------------------------------------------


def driver_rss() -> float:
    """Resident memory of this process (the driver: server and, in simulation, every node's state), bytes.

    Freed heap memory is handed back to the system first (glibc's malloc_trim),
    so that what is counted is what is live.
    """
    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return float(psutil.Process().memory_info().rss)


def driver_peak() -> float:
    """Peak resident memory of this process so far, bytes."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def ray_workers_rss() -> float:
    """Resident memory of the Ray worker processes this driver started (the ClientApp actors), bytes."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            if "default_worker.py" in " ".join(p.cmdline()) or p.name().startswith("ray::"):
                total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


# --- one client count ---------------------------------------------------------


def _wire_bytes(msg: Message) -> int:
    """Bytes of ``msg`` as Flower serialises it (protobuf)."""
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(msg).ByteSize())


def _measure_messages(strategy: Strategy, sizes: dict[str, list[int]]) -> Strategy:
    """Record the wire size of every message ``strategy`` sends and receives."""
    configure, aggregate = strategy.configure_train, strategy.aggregate_train

    def configure_train(*args, **kwargs):
        messages = list(configure(*args, **kwargs))
        sizes["down"].extend(_wire_bytes(m) for m in messages)
        return messages

    def aggregate_train(server_round, replies):
        replies = list(replies)
        sizes["up"].extend(_wire_bytes(m) for m in replies)
        return aggregate(server_round, replies)

    strategy.configure_train, strategy.aggregate_train = configure_train, aggregate_train
    return strategy


def _time_rounds(strategy, grid: Grid, cfg: dict, rounds: int, train_config: ConfigRecord | None) -> float:
    problem = build_problem(cfg)
    t0 = time.perf_counter()
    strategy.start(
        grid=grid, initial_arrays=R.to_record(problem.init_params()), num_rounds=rounds,
        train_config=train_config,
    )
    return (time.perf_counter() - t0) / rounds


def _vectorized_seconds_per_round(cfg: dict[str, Any], rounds: int) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds per round of clip21-gd on the vectorized engine (after one warm-up round), final model."""
    from fl_clip21.engine import run_local

    stamps: list[float] = []
    run_local({**cfg, "rounds": rounds + 1}, "clip21-gd", lambda *_: stamps.append(time.perf_counter()))
    ref = run_local({**cfg, "rounds": rounds}, "clip21-gd")
    return (stamps[-1] - stamps[0]) / rounds, ref["params"]


class _Nodes:
    """A stand-in for the grid in :func:`cpu_per_client_round`: nodes 0..n-1 are there."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(self.n))


def cpu_per_client_round(cfg: dict[str, Any], rounds: int = 5) -> dict[str, float]:
    """CPU seconds per client-round of each part of a round, in this thread, without Flower's engine.

    clip21-gd: the strategy building the messages (``configure``), the client
    handler (``train``), the node state and messages pickled to a worker and
    back as the simulation engine does (``pickle``), the strategy checking and
    applying the replies (``aggregate``); FedAvg's client handler and its
    pickling. Process CPU time, median over rounds after the first two: what
    the machine's load does to wall time is left out. Call it where Flower's
    task identity is set (inside a ServerApp), since it builds messages.
    """
    import pickle

    from flwr.app import Context, MessageType

    n = cfg["num-clients"]
    problem = build_problem(cfg)
    init = problem.init_params()
    contexts = [
        Context(run_id=0, node_id=i, node_config={"partition-id": i, "num-partitions": n}, state=RecordDict(), run_config={})
        for i in range(n)
    ]
    strategy = Clip21Strategy(
        algorithm=algorithm_from_config("clip21-gd", cfg), scenario=cfg, num_clients=n,
        client_of_node={i: i for i in range(n)}, fraction_evaluate=0.0,
    )
    fedavg_config = ConfigRecord({R.SCENARIO: json.dumps(cfg, sort_keys=True)})
    parts: dict[str, list[float]] = {k: [] for k in ("configure", "train", "pickle", "aggregate", "fedavg_train", "fedavg_pickle")}
    clock = time.process_time

    def shipped(obj):
        return pickle.loads(pickle.dumps(obj))

    for k in range(1, rounds + 3):
        arrays = R.to_record(strategy.params if strategy.params is not None else init)
        t0 = clock()
        messages = list(strategy.configure_train(k, arrays, ConfigRecord({}), _Nodes(n)))
        parts["configure"].append(clock() - t0)
        replies, train_s, pickle_s = [], 0.0, 0.0
        for msg in messages:
            nid = msg.metadata.dst_node_id
            t0 = clock()
            context, received = shipped(contexts[nid]), shipped(msg)
            t1 = clock()
            reply = clip21_train(received, context)
            t2 = clock()
            contexts[nid], reply = shipped(context), shipped(reply)
            t3 = clock()
            train_s += t2 - t1
            pickle_s += (t1 - t0) + (t3 - t2)
            reply.metadata.__dict__["_src_node_id"] = nid  # as the engine sets it on delivery
            replies.append(reply)
        parts["train"].append(train_s)
        parts["pickle"].append(pickle_s)
        t0 = clock()
        strategy.aggregate_train(k, replies)
        parts["aggregate"].append(clock() - t0)
        content = RecordDict({R.ARRAYS: arrays, R.CONFIG: fedavg_config})
        train_s = pickle_s = 0.0
        for i in range(n):
            t0 = clock()
            context = shipped(Context(run_id=0, node_id=i, node_config={"partition-id": i}, state=RecordDict(), run_config={}))
            received = shipped(Message(content, dst_node_id=i, message_type=MessageType.TRAIN))
            t1 = clock()
            reply = fedavg_train(received, context)
            t2 = clock()
            shipped(context), shipped(reply)
            t3 = clock()
            train_s += t2 - t1
            pickle_s += (t1 - t0) + (t3 - t2)
        parts["fedavg_train"].append(train_s)
        parts["fedavg_pickle"].append(pickle_s)
    return {k: statistics.median(v[2:]) / n for k, v in parts.items()}


def bench_clients(cfg: dict[str, Any], rounds: int, repeats: int, soak_rounds: int = 0) -> dict[str, Any]:
    """clip21-gd vs FedAvg at ``cfg['num-clients']`` clients (see the module's docstring)."""
    from fl_clip21.flower.simulation import fast_polling, simulate_app

    n = cfg["num-clients"]
    build_problem(cfg)  # in this thread, before Ray starts: data errors surface here
    times: dict[str, list[float]] = {"fedavg": [], "clip21-gd": []}
    sizes: dict[str, list[int]] = {"down": [], "up": []}
    fedavg_sizes: dict[str, list[int]] = {"down": [], "up": []}
    out: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        fast_polling(grid)
        scenario = ConfigRecord({R.SCENARIO: json.dumps(cfg, sort_keys=True)})

        def fedavg():
            with quiet_flower():  # FedAvg warns that fraction_evaluate=0 skips evaluation
                return FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)

        mapping: dict[int, int] = {}

        def clip21(**kwargs):
            return Clip21Strategy(
                algorithm=algorithm_from_config("clip21-gd", cfg), scenario=cfg, num_clients=n,
                client_of_node=mapping, fraction_evaluate=0.0, **kwargs,
            )

        # Warm-up: Ray actors, imports, the problem cache on every actor; the
        # handshake (once per run) is timed apart from the rounds.
        _time_rounds(fedavg(), grid, cfg, 2, scenario)
        first = clip21()
        t0 = time.perf_counter()
        first.handshake(grid)
        out["handshake_seconds"] = time.perf_counter() - t0
        mapping.update(first.client_of_node)
        _time_rounds(first, grid, cfg, 2, None)
        last = None
        for _ in range(repeats):
            times["fedavg"].append(_time_rounds(fedavg(), grid, cfg, rounds, scenario))
            last = _measure_messages(clip21(), sizes)
            times["clip21-gd"].append(_time_rounds(last, grid, cfg, rounds, None))
        out["params"] = last.params
        out["bytes_up_payload"] = [r["bytes_up"] / max(1, r["accepted"]) for r in last.history]
        del first, last
        # FedAvg's message sizes, from one more round whose messages are recorded.
        avg = _measure_messages(fedavg(), fedavg_sizes)
        _time_rounds(avg, grid, cfg, 1, scenario)
        if soak_rounds:
            rss: list[float] = []
            soak = clip21(on_round=lambda rec: rss.append(driver_rss()))
            t0 = time.perf_counter()
            _time_rounds(soak, grid, cfg, soak_rounds, None)
            out["soak"] = {
                "rounds": soak_rounds, "wall_seconds": time.perf_counter() - t0,
                "driver_rss_mb": [x / MB for x in rss],
            }
        out["driver_rss_mb"] = driver_rss() / MB
        out["ray_workers_rss_mb"] = ray_workers_rss() / MB
        out["cpu"] = cpu_per_client_round(cfg)

    simulate_app(server_app, bench_client_app(), cfg)
    fedavg_s = statistics.median(times["fedavg"])
    clip21_s = statistics.median(times["clip21-gd"])
    vec_s, vec_params = _vectorized_seconds_per_round(cfg, rounds)
    gap = core.max_abs_diff(out["params"], vec_params)
    d = model_size(build_problem(cfg).init_params())
    row = {
        "clients": n,
        "rounds": rounds,
        "repeats": repeats,
        "model_entries": d,
        "fedavg_seconds_per_round": fedavg_s,
        "clip21_seconds_per_round": clip21_s,
        "ratio": clip21_s / fedavg_s,
        "clip21_client_rounds_per_second": n / clip21_s,
        "fedavg_client_rounds_per_second": n / fedavg_s,
        "overhead_ms_per_client_round": (clip21_s - fedavg_s) / n * 1e3,
        "handshake_seconds": out["handshake_seconds"],
        "clip21_bytes_down_per_client_round": statistics.mean(sizes["down"]),
        "clip21_bytes_up_per_client_round": statistics.mean(sizes["up"]),
        "clip21_payload_bytes_up_per_client_round": statistics.mean(out["bytes_up_payload"]),
        "fedavg_bytes_down_per_client_round": statistics.mean(fedavg_sizes["down"]),
        "fedavg_bytes_up_per_client_round": statistics.mean(fedavg_sizes["up"]),
        "vectorized_seconds_per_round": vec_s,
        "vectorized_speedup": clip21_s / vec_s,
        "vectorized_max_param_difference": gap,
        "cpu_us_per_client_round": {k: v * 1e6 for k, v in out["cpu"].items()},
        "driver_rss_mb": out["driver_rss_mb"],
        "driver_peak_mb": driver_peak() / MB,
        "ray_workers_rss_mb": out["ray_workers_rss_mb"],
        "all_seconds_per_round": times,
    }
    if "soak" in out:
        rss = out["soak"]["driver_rss_mb"]
        base = rss[min(4, len(rss) - 1)]  # after round 5
        row["soak"] = {**out["soak"], "growth_after_round_5": max(rss[4:] or rss) / base - 1}
    return row


def bench_memory(cfg: dict[str, Any], rounds: int = 2) -> dict[str, Any]:
    """Driver memory clip21-gd adds per client, against FedAvg's, on ``cfg``'s problem.

    The driver holds the server and, in a simulation, every node's context.
    Measured: its resident memory after FedAvg's rounds, then after
    clip21-gd's (the strategy still alive), then after the strategy is gone
    (what is left is the clients' v_i in their node state). The same from the
    allocations made since FedAvg's rounds and still held (``tracemalloc``),
    which leaves out the allocator's slack and RSS's noise. The server's
    copies of the memories are in a file; its size on disk is reported too.
    """
    from fl_clip21.flower.simulation import fast_polling, simulate_app

    n = cfg["num-clients"]
    build_problem(cfg)
    rss: dict[str, float] = {}
    disk: dict[str, int] = {}
    live: dict[str, int] = {}  # bytes allocated since FedAvg's rounds and still held (tracemalloc)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        fast_polling(grid)
        with quiet_flower():
            avg = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        _time_rounds(avg, grid, cfg, rounds, ConfigRecord({R.SCENARIO: json.dumps(cfg, sort_keys=True)}))
        del avg
        rss["fedavg"] = driver_rss()
        tracemalloc.start()
        try:
            strategy = Clip21Strategy(
                algorithm=algorithm_from_config("clip21-gd", cfg), scenario=cfg, num_clients=n, fraction_evaluate=0.0
            )
            _time_rounds(strategy, grid, cfg, rounds, None)
            rss["clip21"] = driver_rss()
            live["clip21"] = tracemalloc.get_traced_memory()[0]
            disk["copies"] = strategy.protocol.copies.path.stat().st_blocks * 512
            del strategy
            rss["clients_only"] = driver_rss()
            live["clients_only"] = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    simulate_app(server_app, bench_client_app(), cfg)
    model_bytes = sum(v.nbytes for v in build_problem(cfg).init_params().values())
    added = (rss["clip21"] - rss["fedavg"]) / n
    clients = (rss["clients_only"] - rss["fedavg"]) / n
    return {
        "clients": n,
        "model_bytes": model_bytes,
        "added_bytes_per_client": added,
        "added_per_client_over_model": added / model_bytes,
        "client_state_bytes_per_client": clients,
        "client_state_over_model": clients / model_bytes,
        "server_bytes_per_client": added - clients,
        "server_copies_file_bytes": disk["copies"],  # on disk, not in RAM
        # The same from the allocations still held (Python objects and numpy arrays, by
        # tracemalloc): free of the allocator's slack and of the noise of RSS.
        "live_added_bytes_per_client": live["clip21"] / n,
        "live_added_per_client_over_model": live["clip21"] / n / model_bytes,
        "live_client_state_bytes_per_client": live["clients_only"] / n,
        "driver_rss_mb": {k: v / MB for k, v in rss.items()},
    }


# --- the command ----------------------------------------------------------------


def _line(row: dict[str, Any]) -> str:
    cpu = row["cpu_us_per_client_round"]
    ours = cpu["configure"] + cpu["train"] + cpu["pickle"] + cpu["aggregate"]
    return (
        f"{row['clients']:>6} clients: clip21-gd {row['clip21_seconds_per_round']:.3f} s/round "
        f"({row['clip21_client_rounds_per_second']:.0f} client-rounds/s), FedAvg "
        f"{row['fedavg_seconds_per_round']:.3f} s/round, ratio {row['ratio']:.3f}; "
        f"overhead {row['overhead_ms_per_client_round']:+.3f} ms/client-round; bytes/client/round "
        f"down {row['clip21_bytes_down_per_client_round']:.0f} (FedAvg {row['fedavg_bytes_down_per_client_round']:.0f}), "
        f"up {row['clip21_bytes_up_per_client_round']:.0f} (FedAvg {row['fedavg_bytes_up_per_client_round']:.0f}); "
        f"vectorized {row['vectorized_speedup']:.0f}x faster (models differ by {row['vectorized_max_param_difference']:.1e}); "
        f"driver {row['driver_rss_mb']:.0f} MB (peak {row['driver_peak_mb']:.0f}), Ray workers {row['ray_workers_rss_mb']:.0f} MB; "
        f"CPU per client-round in process: clip21-gd {cpu['configure']:.0f} configure + {cpu['train']:.0f} train + "
        f"{cpu['pickle']:.0f} pickling + {cpu['aggregate']:.0f} aggregate = {ours:.0f} us, FedAvg's client "
        f"{cpu['fedavg_train']:.0f} train + {cpu['fedavg_pickle']:.0f} pickling = {cpu['fedavg_train'] + cpu['fedavg_pickle']:.0f} us"
    )


def run_bench(
    clients: list[int], rounds: int, repeats: int, scenario: Path = DEFAULT_SCENARIO,
    out: Path | None = None, soak_rounds: int = 0, memory_scenario: Path | None = None,
) -> dict[str, Any]:
    """Benchmark every client count; print a line each; write JSON to ``out``.

    ``soak_rounds`` > 0 adds a run of that many rounds at the largest count,
    with the driver's memory after every round; ``memory_scenario`` adds
    :func:`bench_memory` at the largest count.
    """
    rows = []
    for n in clients:
        cfg = load_scenario(scenario, parse_sets([f"num-clients={n}"]))
        row = bench_clients(cfg, rounds, repeats, soak_rounds if n == max(clients) else 0)
        rows.append(row)
        print(_line(row), flush=True)
        if "soak" in row:
            s = row["soak"]
            print(
                f"{n:>6} clients, {s['rounds']} rounds of clip21-gd in {s['wall_seconds']:.0f} s: driver memory "
                f"{s['driver_rss_mb'][4]:.0f} MB after round 5, {max(s['driver_rss_mb'][4:]):.0f} MB at most after, "
                f"growth {100 * s['growth_after_round_5']:+.1f}%",
                flush=True,
            )
    result: dict[str, Any] = {
        "scenario": str(scenario),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
        },
        "results": rows,
    }
    if memory_scenario is not None:
        mem_cfg = load_scenario(memory_scenario, parse_sets([f"num-clients={max(clients)}"]))
        mem = bench_memory(mem_cfg)
        result["memory"] = {"scenario": str(memory_scenario), **mem}
        print(
            f"{mem['clients']:>6} clients, model of {mem['model_bytes']} bytes: clip21-gd adds "
            f"{mem['added_bytes_per_client']:.0f} bytes per client ({mem['added_per_client_over_model']:.2f}x the model; "
            f"allocations held: {mem['live_added_bytes_per_client']:.0f}, {mem['live_added_per_client_over_model']:.2f}x): "
            f"{mem['client_state_over_model']:.2f}x in the clients' state, {mem['server_bytes_per_client']:.0f} bytes "
            f"per client in the server; the server's copies file holds {mem['server_copies_file_bytes'] / MB:.0f} MB on disk",
            flush=True,
        )
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1))
    return result
