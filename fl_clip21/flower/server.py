"""ServerApp side: run every algorithm of a scenario on a Flower Grid."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flwr.serverapp.strategy
from flwr.common.logger import LOGGER_NAME
from flwr.serverapp import Grid

from fl_clip21.algorithms import algorithm_from_config
from fl_clip21.engine import evaluate, reply_timeout
from fl_clip21.flower import records as R
from fl_clip21.flower.strategy import Clip21Strategy
from fl_clip21.problems import build_problem

# on_round(algorithm, record, rounds) is called after every round, for progress displays.
OnRound = Callable[[str, dict[str, Any], int], None]

# Flower's strategy package: Strategy.start, FedAvg and the DP wrappers narrate every round there.
FLOWER_STRATEGY_DIR = str(Path(flwr.serverapp.strategy.__file__).parent) + os.sep


class _FlowerRoundNarration(logging.Filter):
    """Drops the INFO lines logged from Flower's strategy package (warnings and errors pass).

    Strategy.start logs 3 lines a round and, at the end, every round's metrics
    again (about 14 lines a round): 4,300 lines for the 3 algorithms of
    logreg-nonconvex, where fl-clip21's records and progress lines say the same.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not record.pathname.startswith(FLOWER_STRATEGY_DIR)


@contextlib.contextmanager
def quiet_flower_rounds() -> Iterator[None]:
    """Within the block, Flower's logger leaves out its strategies' per-round INFO lines."""
    logger, narration = logging.getLogger(LOGGER_NAME), _FlowerRoundNarration()
    logger.addFilter(narration)
    try:
        yield
    finally:
        logger.removeFilter(narration)


def run_algorithm(
    grid: Grid,
    cfg: dict[str, Any],
    name: str,
    on_round: OnRound | None = None,
    timeout: float | None = None,
    checkpoint: Path | None = None,
    node_keys: Mapping[bytes, int] | None = None,
) -> dict[str, Any]:
    """Run one algorithm for ``cfg['rounds']`` rounds; returns its records and final model.

    Replies later than ``timeout`` seconds (default: the scenario's
    ``round-timeout``, see :func:`~fl_clip21.engine.reply_timeout`) are dropped.

    With ``checkpoint``, the server's state is saved there after every round,
    and a run whose checkpoint already exists continues from it. ``node_keys``
    (:func:`~fl_clip21.flower.identity.load_node_keys`) binds each partition to
    the authenticated SuperNode key that may hold it.
    """
    problem = build_problem(cfg)
    strategy = Clip21Strategy(
        algorithm=algorithm_from_config(name, cfg),
        scenario=cfg,
        num_clients=cfg["num-clients"],
        fraction=cfg["fraction"],
        availability=cfg.get("availability", 1.0),
        sampling=cfg.get("sampling", "fixed"),
        late_reply_wait=cfg.get("straggler-delay", 0.0) + 600.0,
        seed=cfg["seed"],
        audit=cfg["audit"],
        delta=cfg["delta"],
        checkpoint=checkpoint,
        node_keys=node_keys,
        evaluate=lambda params: evaluate(problem, params),
        fraction_evaluate=0.0,  # the server evaluates the model itself (evaluate=), the nodes only train
        on_round=(lambda rec: on_round(name, rec, cfg["rounds"])) if on_round is not None else None,
    )
    done = strategy.resume(checkpoint) if checkpoint is not None and checkpoint.exists() else 0
    start = time.perf_counter()
    if done < cfg["rounds"]:
        strategy.start(
            grid=grid,
            initial_arrays=R.to_record(strategy.params if done else problem.init_params()),
            num_rounds=cfg["rounds"] - done,
            timeout=timeout if timeout is not None else reply_timeout(cfg),
        )
    return {
        "records": strategy.history,
        "params": strategy.params,
        "wall_seconds": time.perf_counter() - start,
        "resumed_from_round": done,
    }


def run_scenario(
    grid: Grid, cfg: dict[str, Any], on_round: OnRound | None = None, checkpoint_dir: Path | None = None,
    node_keys: Mapping[bytes, int] | None = None,
) -> dict[str, dict]:
    """Run every algorithm the scenario lists, one after the other, on ``grid``.

    With ``checkpoint_dir``, each algorithm (Flower's DP baselines too) checkpoints to
    ``checkpoint_dir/NAME.npz`` after every round and continues from there if it exists.
    """
    from fl_clip21.flower import dp_baseline

    results = {}
    for name in cfg["algorithms"]:
        ckpt = checkpoint_dir / f"{name}.npz" if checkpoint_dir is not None else None
        if name in dp_baseline.NAMES:
            results[name] = dp_baseline.run_flower_dp(
                grid, cfg, name, on_round, timeout=reply_timeout(cfg), checkpoint=ckpt
            )
        else:
            results[name] = run_algorithm(grid, cfg, name, on_round, checkpoint=ckpt, node_keys=node_keys)
    return results
