"""``Clip21CentralDP``: central (user-level) DP around a Clip21Strategy, in the style of Flower's DP wrappers.

Flower's ``DifferentialPrivacyClientSideFixedClipping`` wraps a strategy, lets it
configure and aggregate, and noises the aggregate. Clip21's server does not
average models: it adds the round's noisy sum of clipped increments to g. So
the wrapper configures the wrapped :class:`~fl_clip21.flower.strategy.Clip21Strategy`
to add the noise where every engine adds it, :meth:`Algorithm.server_round
<fl_clip21.algorithms.Algorithm.server_round>` (the same function and the
same seeded draws as ``dp = "central"`` on the batched engine, via
:func:`~fl_clip21.algorithms.with_central_dp`), delegates every round to it,
and owns the accountant: it logs epsilon after every round
(:mod:`fl_clip21.privacy`; docs/algorithms.md, "Central (user-level) DP").

Example (a ServerApp; the ClientApp is fl-clip21's, or any app under ``clip21_mod``)::

    strategy = Clip21Strategy(algorithm=make_algorithm("clip21-sgd", lr=0.5, tau=0.1), scenario=cfg,
                              num_clients=100, fraction=0.1, seed=0)
    dp = Clip21CentralDP(strategy, noise_multiplier=1.1, clipping_norm=0.1)
    dp.start(grid, initial_arrays, num_rounds=50)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from fl_clip21.algorithms import CENTRAL_DP, central_sampling, with_central_dp
from fl_clip21.flower.strategy import Clip21Strategy
from fl_clip21.privacy import central_epsilon


class Clip21CentralDP(Strategy):
    """Central DP for the clipping family run by a :class:`Clip21Strategy`.

    Each round the server adds N(0, (z C)^2 I) to the sum of the clipped
    messages (Clip21: the increments c_i, ||c_i|| <= C = tau) and divides by the
    fixed number m of clients a round where the algorithm takes a mean.

    Parameters
    ----------
    strategy:
        The wrapped strategy; its algorithm must be one of the clipping family
        (:data:`~fl_clip21.algorithms.CENTRAL_DP`) built without noise. It
        keeps sampling (fixed-size or Poisson, seeded by its ``seed``), the
        consistency protocol and its checkpoints (wrap before :meth:`resume
        <Clip21Strategy.resume>`).
    noise_multiplier:
        z: the noise's std on the sum over the clipping norm (Flower's meaning).
    clipping_norm:
        C, the bound one client's message has: the algorithm's ``tau``.
    num_sampled_clients:
        m, the clients a round (Flower's name); it must be the strategy's
        round(fraction x n) with fixed-size sampling. None: the strategy's.
    sampling:
        ``fixed`` or ``poisson``; None: the strategy's (it must agree).
    seed:
        The seed of the noise; None: the strategy's, which draws it (a
        different one is an error: noise and sampling come from one seed).
    delta:
        delta of the reported epsilon; None: the strategy's.
    secure:
        Draw the noise from OS entropy instead of the seed (deployments: the
        seed is in the scenario every client receives, or guessable). None:
        the strategy's ``secure-noise`` config key. With Poisson sampling the
        strategy's config must say ``secure-noise`` too, so that its sample is
        secret as well (amplification needs it).

    Accounting: Poisson sampling, add/remove-one adjacency with
    amplification; a fixed number m < n of clients, replace-one (multiplier
    z / 2, no amplification); everyone, add/remove-one (z).
    """

    def __init__(
        self,
        strategy: Clip21Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int | None = None,
        sampling: str | None = None,
        seed: int | None = None,
        delta: float | None = None,
        secure: bool | None = None,
    ) -> None:
        super().__init__()
        algorithm = strategy.algorithm
        if algorithm.name not in CENTRAL_DP:
            raise ValueError(f"Clip21CentralDP wraps the clipping family ({', '.join(CENTRAL_DP)}), got {algorithm.name}")
        if algorithm.central is not None or algorithm.noise_multiplier is not None:
            raise ValueError(f"the wrapped {algorithm.name} already adds DP noise: build it without sigma or dp")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        tau = algorithm.hyper["tau"]
        if abs(clipping_norm - tau) > 1e-12 * tau:
            raise ValueError(f"clipping_norm must be the tau {algorithm.name}'s clients clip to, {tau!r}, "
                             f"got {clipping_norm!r}")
        if strategy.num_clients is None:
            raise ValueError("Clip21CentralDP needs the strategy's num_clients (n): the accountant counts on it")
        sampling = strategy.sampling if sampling is None else sampling
        if sampling != strategy.sampling:
            raise ValueError(f"sampling must be the strategy's {strategy.sampling!r}, got {sampling!r}")
        if seed is not None and seed != strategy.seed:
            raise ValueError(f"seed must be the strategy's seed {strategy.seed} (it draws the noise and the sample), "
                             f"got {seed!r}: build the strategy with seed={seed}")
        m, q, replace_one = central_sampling(
            {"num-clients": strategy.num_clients, "fraction": strategy.fraction, "sampling": sampling}
        )
        if num_sampled_clients is not None and (sampling == "poisson" or num_sampled_clients != m):
            raise ValueError(
                f"num_sampled_clients must be the strategy's round(fraction x n) = {m:g} with fixed-size sampling "
                f"(Poisson sampling: leave it out), got {num_sampled_clients!r}"
            )
        secret_sample = bool(strategy.config.get("secure-noise", False))
        secure = secret_sample if secure is None else secure
        if secure and sampling == "poisson" and not secret_sample:
            raise ValueError(
                "secure=True with Poisson sampling needs the strategy's config secure-noise=true too: its Poisson "
                "sample must come from OS entropy like the noise, or amplification cannot be claimed"
            )
        strategy.algorithm = with_central_dp(algorithm, noise_multiplier * tau, m, q, replace_one=replace_one,
                                             secure=secure)
        self.strategy = strategy
        self.noise_multiplier, self.clipping_norm, self.num_sampled_clients = noise_multiplier, clipping_norm, m
        self.sampling_rate = q
        self.delta = strategy.delta if delta is None else delta
        self.epsilon = 0.0

    @property
    def accounted_multiplier(self) -> float | None:
        """The multiplier the accountant uses (z, or z / 2 under replace-one), None without noise."""
        return self.strategy.algorithm.noise_multiplier

    def privacy_spent(self) -> tuple[float, float]:
        """(epsilon, delta) after the rounds run so far (a resumed strategy's earlier rounds included)."""
        return self.epsilon, self.delta

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = self.strategy.aggregate_train(server_round, replies)  # the noise is added in there
        z = self.accounted_multiplier
        if z is not None:
            self.epsilon = central_epsilon(z, self.strategy.round, self.delta, self.sampling_rate)
            log(INFO, "Clip21CentralDP: epsilon=%.6g at delta=%g after %d rounds", self.epsilon, self.delta,
                self.strategy.round)
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's :meth:`Strategy.start`, then the wrapped strategy's wait for late replies."""
        result = super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)
        self.strategy.await_late_replies(grid)
        return result

    def summary(self) -> None:
        log(INFO, "\t├──> Central DP (Clip21CentralDP):")
        log(INFO, "\t│\t├── Noise multiplier: %s (accounted: %s)", self.noise_multiplier, self.accounted_multiplier)
        log(INFO, "\t│\t├── Clipping norm: %s", self.clipping_norm)
        log(INFO, "\t│\t└── Clients a round: %s (%s)", self.num_sampled_clients, self.strategy.sampling)
        self.strategy.summary()
