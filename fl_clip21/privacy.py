"""Privacy accounting, local and central, with dp-accounting; the closed form of mu-GDP as a second accountant.

Local DP (below) and central DP (further below, with the adjacency each
sampling allows) follow docs/algorithms.md, "Privacy (local DP)" and "Central
(user-level) DP". :func:`gdp_epsilon` computes the exact epsilon of composed
Gaussian mechanisms from Dong, Roth and Su's closed form with scipy alone: the
tests hold every reported epsilon to never be below it.

Local DP. Adjacency and claim: one client's local dataset is replaced by
a neighbouring one. Each message ``clip_tau(.) + N(0, sigma^2 I)`` then moves
by at most 2 tau in L2 for any fixed history of public messages, so a round is
a Gaussian mechanism with noise multiplier ``z = sigma / (2 tau)``, and T rounds
are its adaptive T-fold composition. The guarantee is local DP of each client
against everyone who sees its messages (the server included). Nothing is
claimed from subsampling: a client's epsilon counts every round it was asked.

The T-fold composition of Gaussian mechanisms of multiplier z is exactly the
Gaussian mechanism of multiplier z / sqrt(T) (mu-GDP with mu = sqrt(T) / z), so
epsilon is dp-accounting's analytic Gaussian-mechanism epsilon (Balle and Wang,
2018) at that multiplier: exact, not a bound, and the tests check it against
dp-accounting's PLD and RDP accountants (both upper bounds). The root finder's
tolerance is added on top, so the reported epsilon is never below the true one.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_TOL = 1e-10


def _check(z: float, rounds: int, delta: float) -> None:
    if not z > 0:
        raise ValueError(f"noise multiplier must be > 0, got {z!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


@functools.lru_cache(maxsize=65536)
def epsilon(z: float, rounds: int, delta: float) -> float:
    """epsilon at ``delta`` after ``rounds`` Gaussian mechanisms of multiplier ``z``."""
    _check(z, rounds, delta)
    if rounds == 0:
        return 0.0
    from dp_accounting import gaussian_mechanism  # 1.8 s to import: only where epsilon is needed

    eps = gaussian_mechanism.get_epsilon_gaussian(z / math.sqrt(rounds), delta, tol=_TOL)
    return float(eps) + 2 * _TOL if eps > 0 else 0.0


def calibrate_noise_multiplier(target_epsilon: float, rounds: int, delta: float) -> float:
    """The smallest z (within 1e-9 relative) whose ``rounds``-fold composition has epsilon <= target."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target-epsilon must be > 0, got {target_epsilon!r}")
    _check(1.0, rounds, delta)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    from dp_accounting import gaussian_mechanism

    z = float(gaussian_mechanism.get_sigma_gaussian(target_epsilon, delta, tol=_TOL)) * math.sqrt(rounds)
    while epsilon(z, rounds, delta) > target_epsilon:
        z *= 1 + 1e-9
    return z


def gdp_epsilon(mu: float, delta: float) -> float:
    """epsilon at ``delta`` of a mu-GDP mechanism, from the closed form, with scipy: a second accountant.

    Dong, Roth and Su (2022), Corollary 2.13: a mechanism is mu-GDP iff it is
    (epsilon, delta(epsilon))-DP for every epsilon >= 0 with
    ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``. T composed
    Gaussian mechanisms of multiplier z are mu-GDP with mu = sqrt(T) / z, so this
    is the exact epsilon of full participation, computed without dp-accounting
    (the tests hold :func:`epsilon` to never be below it). The root is bracketed
    to 1e-12 and its upper end returned.
    """
    from scipy.optimize import brentq
    from scipy.stats import norm

    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"mu must be > 0, got {mu!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")

    def excess(eps: float) -> float:  # delta(eps) - delta, decreasing in eps; e^eps Phi(.) in logs
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2))) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = max(1.0, mu * mu)
    while excess(hi) > 0:
        hi *= 2
    root = brentq(excess, 0.0, hi, xtol=1e-12, rtol=4 * np.finfo(float).eps)
    return float(root) + 1e-12


# --- central (user-level) DP ----------------------------------------------------------
#
# The accountant's mechanism: each round the server adds N(0, sigma^2 I) to the sum
# of the clipped messages; s is how far one neighbouring dataset can move that sum,
# and z = sigma / s the multiplier of the Gaussian mechanism a round is.
#
# - Add/remove one client (Poisson sampling, or everyone every round): one client
#   moves the sum by at most its clipping bound, s = tau. With Poisson sampling of
#   rate q < 1 each round is that mechanism on a Poisson subsample and the
#   accountant uses the amplification by subsampling.
# - A fixed number m < n of clients a round (fixed-size sampling): adding one
#   client changes which m are drawn, so the sum can change by far more than tau.
#   The adjacency is then replace-one (same n, one client's data replaced): the
#   sample is the same, one message changes, s = 2 tau, so the multiplier is half
#   of the add/remove one; no amplification is claimed.
#
# T rounds without amplification compose to the Gaussian mechanism of multiplier
# z / sqrt(T). (docs/algorithms.md, "Central (user-level) DP".)


def accounted_multiplier(z: float, replace_one: bool) -> float:
    """The multiplier the accountant uses for noise ``z`` times the clipping bound: z/2 under replace-one."""
    return z / 2 if replace_one else z


def _central_event(z: float, rounds: int, q: float):
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent

    event = GaussianDpEvent(z) if q >= 1 else PoissonSampledDpEvent(q, GaussianDpEvent(z))
    return SelfComposedDpEvent(event, rounds)


@functools.lru_cache(maxsize=256)
def _round_rdp(z: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP of one round) of the Poisson-subsampled Gaussian: T rounds are T times it."""
    import logging

    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # its notes on orders it leaves out
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(_central_event(z, 1, q))
    # The accountant's RDP curve (its own attribute): composing T rounds multiplies it by T.
    return np.asarray(acc._orders), np.asarray(acc._rdp)


@functools.lru_cache(maxsize=4096)
def central_epsilon(z: float, rounds: int, delta: float, q: float = 1.0, accountant: str = "rdp") -> float:
    """epsilon at ``delta`` after ``rounds`` rounds of central DP of multiplier ``z``, sampling rate ``q``.

    ``q`` = 1 (no amplification claimed) is exact (:func:`epsilon`). For q < 1,
    dp-accounting's RDP accountant (an upper bound; one round's RDP curve is
    computed once and scaled by the rounds), or with ``accountant="pld"`` its
    PLD accountant (pessimistic estimate: a tighter upper bound, seconds a call).
    """
    _check(z, rounds, delta)
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q!r}")
    if rounds == 0:
        return 0.0
    if q >= 1:
        return epsilon(z, rounds, delta)
    if accountant == "pld":
        from dp_accounting import NeighboringRelation
        from dp_accounting.pld import PLDAccountant

        acc = PLDAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc.compose(_central_event(z, rounds, q))
        return float(acc.get_epsilon(delta)) + 2 * _TOL
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    orders, rdp = _round_rdp(z, q)
    return float(compute_epsilon(orders, rounds * rdp, delta)[0]) + 2 * _TOL


def calibrate_central(target_epsilon: float, rounds: int, delta: float, q: float = 1.0) -> float:
    """The smallest z (within 1e-6 relative) whose central epsilon after ``rounds`` rounds is <= target."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target-epsilon must be > 0, got {target_epsilon!r}")
    if q >= 1:
        return calibrate_noise_multiplier(target_epsilon, rounds, delta)
    lo, hi = 1e-3, 1.0
    while central_epsilon(hi, rounds, delta, q) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"target-epsilon={target_epsilon!r} needs a noise multiplier above 1e6")
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if central_epsilon(mid, rounds, delta, q) <= target_epsilon else (mid, hi)
    return hi
