"""Privacy accounting of the local Gaussian mechanism, with dp-accounting.

Adjacency and claim (docs/algorithms.md, Privacy): one client's local dataset is replaced by
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
