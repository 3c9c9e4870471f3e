"""Flower's own DP FedAvg strategies, as Flower users run them: seeded, resumable, driven by the scenario.

Three baselines (docs/algorithms.md, "DP-FedAvg"), each Flower's ``FedAvg``
inside one of Flower 1.42's DP wrappers, clients running plain local training
(``local-steps`` minibatch SGD steps of size ``lr``):

- ``flower-dp-client-fixed`` (older name ``flower-dp-fixed``):
  ``DifferentialPrivacyClientSideFixedClipping``, clients under Flower's
  ``fixedclipping_mod``, which clips the model update;
- ``flower-dp-server-fixed``: ``DifferentialPrivacyServerSideFixedClipping``
  (the server clips the updates);
- ``flower-dp-adaptive``: ``DifferentialPrivacyServerSideAdaptiveClipping``
  (the server clips and adapts the clipping norm, Andrew et al. 2021).

Scenario keys -> Flower's parameters: clipping norm C = ``lr * tau`` (the first
one for adaptive clipping); ``noise_multiplier`` z = :func:`~fl_clip21.algorithms.server_sigma`
/ tau (``dp = "central"``: sigma / tau; ``dp = "local"``: sigma / (2 tau), the
multiplier of the local algorithms); ``num_sampled_clients`` m =
round(fraction n); ``target-quantile``, ``clip-lr``, ``count-stddev`` for
adaptive clipping. The batched ``dp-fedavg`` and ``dp-fedavg-adaptive`` compute
the same iterates (tests/test_dp_baselines.py).

Where this differs from Flower 1.42, and why (each a small override):

- Sampling: Flower's FedAvg samples nodes with Python's unseeded ``random``;
  here the round's clients are :func:`fl_clip21.engine.sample_clients`' (fixed
  size), sent to the nodes that claim those partitions in a handshake.
- Noise: Flower draws it with numpy's global generator; here it is the
  server's stream of the round (:func:`fl_clip21.engine.server_noise`), or OS
  entropy with ``secure-noise``. The model gets ``- (z C / m) xi``: the draw xi
  the batched engine adds to the sum of the updates x - y_i it subtracts.
- Adaptive clipping: Flower 1.42 counts the *clipped* updates and puts their
  fraction into Andrew et al.'s rule written for the *unclipped* fraction, so
  its C moves away from the target quantile; and it noises the round's
  aggregate with the norm already updated for the next round, not the one the
  updates were clipped to. Here the fraction is Andrew et al.'s noisy unclipped
  fraction ``1/2 + (sum_i (b_i - 1/2) + N(0, count-stddev^2)) / m`` and the noise
  uses the round's C.

Accounting (:mod:`fl_clip21.privacy`): a fixed number m of clients a round;
with m < n the adjacency is replace-one (the multiplier the accountant uses is
z / 2, no amplification), with m = n add/remove-one (z). Poisson sampling is
refused (:func:`fl_clip21.config.resolve`): Flower divides by the number of
replies, not by a fixed m. With a checkpoint the server's state (model, round,
clipping norm, records) is saved after every round and a run continues from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl_clip21 import checkpoint as ckpt
from fl_clip21 import core
from fl_clip21.algorithms import central_sampling, server_sigma
from fl_clip21.config import with_node_config
from fl_clip21.engine import evaluate, sample_clients, server_noise
from fl_clip21.flower import records as R
from fl_clip21.flower import validation as V
from fl_clip21.flower.client import partition_of
from fl_clip21.flower.records import quiet_flower
from fl_clip21.layout import Layout
from fl_clip21.privacy import accounted_multiplier, central_epsilon
from fl_clip21.problems import Minibatch, build_problem

CLIENT_FIXED = "flower-dp-client-fixed"
SERVER_FIXED = "flower-dp-server-fixed"
ADAPTIVE = "flower-dp-adaptive"
ALIASES = {"flower-dp-fixed": CLIENT_FIXED}
NAMES = (CLIENT_FIXED, SERVER_FIXED, ADAPTIVE, *ALIASES)


class ClientSetupError(RuntimeError):
    """The nodes do not hold the scenario's clients, one partition each."""


def is_flower_message(msg: Message) -> bool:
    """A train message from a Flower strategy rather than from Clip21Strategy."""
    config = R.get_record(msg.content, R.CONFIG, ConfigRecord)
    return config is None or R.ALGORITHM not in config


def local_training(msg: Message, context: Context) -> Message:
    """Plain Flower client training: ``local-steps`` SGD steps from the received model."""
    config = msg.content[R.CONFIG]
    cfg = with_node_config(json.loads(str(config[R.SCENARIO])), context.node_config)
    problem = build_problem(cfg)
    i = partition_of(context)
    server_round = int(config.get(R.ROUND, 0))
    params = R.from_record(msg.content[R.ARRAYS])
    for step in range(cfg["local-steps"]):
        minibatch = Minibatch(cfg["seed"], server_round, cfg["batch-size"], step)
        params = core.add(params, problem.client_grad(i, params, minibatch), -cfg["lr"])
    return Message(
        RecordDict({R.ARRAYS: R.to_record(params), R.METRICS: MetricRecord({"num-examples": 1})}),
        reply_to=msg,
    )


def flower_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` for the messages of Flower's client-side clipping; others pass through."""
    config = R.get_record(msg.content, R.CONFIG, ConfigRecord)
    if is_flower_message(msg) and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def node_of_client(grid: Grid, num_clients: int, scenario: str, timeout: float) -> dict[int, int]:
    """Client index -> node id: every node is asked which partition it holds (the query handshake)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise ClientSetupError(f"only {len(nodes)} of num-clients={num_clients} nodes connected in {timeout:.0f} s")
        time.sleep(0.2)
    query = ConfigRecord({R.SCENARIO: scenario})
    msgs = [Message(RecordDict({R.CONFIG: query}), dst_node_id=nid, message_type=MessageType.QUERY) for nid in nodes]
    out: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise ClientSetupError(f"node {reply.metadata.src_node_id} failed the handshake: {reply.error.reason}")
        c = V.decode_handshake(reply.content, num_clients)
        if c in out:
            raise ClientSetupError(f"nodes {out[c]} and {reply.metadata.src_node_id} both hold partition {c}")
        out[c] = reply.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(out))
    if missing:
        raise ClientSetupError(f"no node holds partitions {missing[:20]} of num-clients={num_clients}")
    return out


class SeededFedAvg(FedAvg):
    """Flower's FedAvg whose train round goes to :func:`~fl_clip21.engine.sample_clients`' clients.

    Round numbers continue from ``offset`` (a resumed run); it also records
    what each round received (for the run's records).
    """

    def __init__(self, *, cfg: dict[str, Any], offset: int = 0) -> None:
        n = cfg["num-clients"]
        m = int(central_sampling({**cfg, "sampling": "fixed"})[0])
        with quiet_flower():  # FedAvg warns that fraction_evaluate=0 skips client evaluation
            super().__init__(fraction_train=m / n, fraction_evaluate=0.0, min_train_nodes=m, min_available_nodes=n)
        self.cfg, self.offset, self.num_sampled = cfg, offset, m
        self.scenario = json.dumps(cfg, sort_keys=True)
        self.node_of: dict[int, int] | None = None
        self.last: dict[str, Any] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        cfg = self.cfg
        if self.node_of is None:
            self.node_of = node_of_client(grid, cfg["num-clients"], self.scenario, 600.0)
        k = self.offset + server_round
        clients = sample_clients(cfg["seed"], k, cfg["num-clients"], cfg["fraction"])
        config[R.ROUND] = k  # FedAvg's "server-round": the clients' minibatches are drawn for it
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [self.node_of[c] for c in clients], MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        self.last = {
            "participants": self.num_sampled, "accepted": len(ok), "failed": self.num_sampled - len(ok),
            "rejected": 0, "bytes_up": sum(V.payload_bytes(r.content.get(R.ARRAYS)) for r in ok),
        }
        return super().aggregate_train(server_round, ok)


class _ServerStreamNoise:
    """Flower's DP noise from the server's stream of the round (or OS entropy): mixed into Flower's wrappers."""

    layout: Layout
    cfg: dict[str, Any]
    round_clip: float

    def server_draw(self, k: int, step: int = 0) -> np.ndarray:
        """The round's N(0, I_d) draw ``step``: the same numbers the batched engine adds."""
        if self.cfg.get("secure-noise", False):
            return np.random.default_rng().standard_normal(self.layout.size)
        return server_noise(self.cfg["seed"], k, self.layout.size)(step)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        # Flower's own: aggregate + N(0, (z C / m)^2) from np.random; here from the server's stream,
        # with the clipping norm of the round (adaptive clipping has already moved self.clipping_norm).
        std = self.noise_multiplier * self.round_clip / self.num_sampled_clients
        x = self.layout.flatten(R.from_record(aggregated))
        noisy = x - std * self.server_draw(self.round).astype(x.dtype, copy=False)
        return R.to_record(self.layout.unflatten(noisy))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.round = self.strategy.offset + server_round
        self.round_clip = self.clipping_norm
        return super().configure_train(server_round, arrays, config, grid)


class SeededClientSideFixedClipping(_ServerStreamNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping, its noise from the server's stream."""


class SeededServerSideFixedClipping(_ServerStreamNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, its noise from the server's stream."""


class SeededServerSideAdaptiveClipping(_ServerStreamNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with Andrew et al.'s noisy unclipped fraction."""

    def _noisy_fraction(self, count: int, total: int) -> float:
        # Flower passes the count of clipped updates; Andrew et al.'s rule takes the unclipped fraction.
        unclipped = total - count
        if self.noise_multiplier == 0:
            return unclipped / total if total else self.target_clipped_quantile
        noise = self.clipped_count_stddev * float(self.server_draw(self.round, 1)[0])
        return 0.5 + (unclipped - total / 2 + noise) / self.num_sampled_clients


def noise_multiplier(cfg: dict[str, Any]) -> float:
    """Flower's ``noise_multiplier``: the noise's std on the sum over the clipping norm."""
    return server_sigma(cfg) / cfg["tau"]


def make_strategy(name: str, cfg: dict[str, Any], layout: Layout, offset: int = 0, clip: float | None = None):
    """Flower's DP strategy ``name`` for scenario ``cfg`` (rounds after ``offset``, adaptive norm ``clip``)."""
    name = ALIASES.get(name, name)
    fedavg = SeededFedAvg(cfg=cfg, offset=offset)
    z, m, first = noise_multiplier(cfg), fedavg.num_sampled, cfg["lr"] * cfg["tau"]
    with quiet_flower():
        if name == CLIENT_FIXED:
            strategy = SeededClientSideFixedClipping(fedavg, z, first, m)
        elif name == SERVER_FIXED:
            strategy = SeededServerSideFixedClipping(fedavg, z, first, m)
        elif name == ADAPTIVE:
            strategy = SeededServerSideAdaptiveClipping(
                fedavg, z, m, initial_clipping_norm=clip if clip is not None else first,
                target_clipped_quantile=cfg["target-quantile"], clip_norm_lr=cfg["clip-lr"],
                clipped_count_stddev=(cfg["count-stddev"] or m / 20) if z > 0 else None,
            )
        else:
            raise ValueError(f"unknown Flower DP baseline {name!r}; known: {', '.join(NAMES)}")
    strategy.layout, strategy.cfg, strategy.round, strategy.round_clip = layout, cfg, offset, strategy.clipping_norm
    return strategy


def accounted(cfg: dict[str, Any]) -> float | None:
    """The multiplier the accountant uses for a Flower baseline of ``cfg`` (None without noise)."""
    z = noise_multiplier(cfg)
    if z <= 0:
        return None
    return accounted_multiplier(z, central_sampling({**cfg, "sampling": "fixed"})[2])


def run_flower_dp(
    grid: Grid, cfg: dict[str, Any], name: str = CLIENT_FIXED, on_round=None, timeout: float = 3600.0,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Run Flower's DP baseline ``name`` for ``cfg['rounds']`` rounds; the same records as the other algorithms.

    With ``checkpoint``, the model, the round, the clipping norm and the records
    are saved there after every round, and a run whose checkpoint exists
    continues from it (a :class:`~fl_clip21.checkpoint.CheckpointError` if it
    was made with another configuration).
    """
    problem = build_problem(cfg)
    params, done, history, clip = problem.init_params(), 0, [], None
    if checkpoint is not None and Path(checkpoint).exists():
        arrays, meta = ckpt.load(Path(checkpoint))
        what = f"checkpoint {str(checkpoint)!r}"
        ckpt.compare_config({"algorithm": meta.get("algorithm"), **meta.get("config", {})},
                            {"algorithm": name, **cfg}, what)
        try:
            params, done, history, clip = arrays["params"], int(meta["round"]), list(meta["history"]), meta["clip"]
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{what} is incomplete or malformed ({type(e).__name__}: {e})") from None
    strategy = make_strategy(name, cfg, problem.layout, offset=done, clip=clip)
    fedavg: SeededFedAvg = strategy.strategy
    z = accounted(cfg)
    records: list[dict[str, Any]] = history
    state = {"t0": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            state["t0"] = time.perf_counter()
            return None
        k = done + server_round
        rec = {"round": k, **fedavg.last, "seconds": time.perf_counter() - state["t0"]}
        if z is not None:
            # Every client may have been in every round: no amplification is claimed.
            rec.update(epsilon=central_epsilon(z, k, cfg["delta"]), noise_multiplier=z)
        params = R.from_record(arrays)
        rec.update(evaluate(problem, params))
        records.append(rec)
        if checkpoint is not None:
            meta = {"algorithm": name, "config": cfg, "round": k, "history": records,
                    "clip": float(strategy.clipping_norm)}
            ckpt.save(Path(checkpoint), {"params": params}, meta)
        if on_round is not None:
            on_round(name, rec, cfg["rounds"])
        state["t0"] = time.perf_counter()
        return MetricRecord({k2: v for k2, v in rec.items() if k2 != "round"})

    start = time.perf_counter()
    final = params
    if done < cfg["rounds"]:
        result = strategy.start(
            grid=grid,
            initial_arrays=R.to_record(params),
            num_rounds=cfg["rounds"] - done,
            timeout=timeout,
            train_config=ConfigRecord({R.SCENARIO: json.dumps(cfg, sort_keys=True)}),
            evaluate_fn=evaluate_fn,
        )
        final = R.from_record(result.arrays) if len(result.arrays) else params
    return {
        "records": records,
        "params": final,
        "wall_seconds": time.perf_counter() - start,
        "resumed_from_round": done,
    }
