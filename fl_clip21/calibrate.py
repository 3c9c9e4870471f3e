"""``fl-clip21 calibrate``: choose tau from the norms of the clients' updates.

Clipping at tau clips every client whose update is longer than tau. Clip21's
error feedback removes the bias this causes, but not the slower start: a tau
far below every update makes the rounds crawl (each client moves its memory by
at most tau a round). So tau is read off the norms the clients actually
produce, over a few probe rounds without clipping.

The rule (one for the command line, for Flower apps and for the quickstart
example): **tau = the largest median (``q50``, or the quantile asked for) of
rounds 1..K** of the probe, K = :data:`PROBE_ROUNDS` by default. Round 1 alone
misleads: the memories start at zero, and the updates of a network that is
still on its first plateau are small; the quickstart CNN's median update grows
fifteenfold from round 1 to round 4 (README, "Choosing tau"), and a tau set at
round 1's median then clips nine updates in ten.

``calibrate`` runs the scenario's unclipped counterpart (GD, or SGD for
stochastic algorithms) for K rounds on the in-process engine and reports, per
round, the quantiles of ||update|| over the clients. A Flower app reads the
same figures from its own probe run (Clip21Strategy with tau above every
update): every round's metrics carry ``update_norm_q10 ... update_norm_max``
and ``input_norm_*`` (the norms clip21_mod sees), and :func:`suggest_tau` turns
the probe's rounds into tau.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fl_clip21.algorithms import HYPER_KEYS, algorithm_from_config
from fl_clip21.config import ConfigError

QUANTILES = {"q10": 0.1, "q50": 0.5, "q90": 0.9, "max": 1.0}
PROBE_ROUNDS = 5  # K: the rounds the rule takes its largest quantile over
NORMS = ("input_norm", "update_norm")

RoundRecords = Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]] | Mapping[str, Any]


def _rounds(records: RoundRecords) -> list[Mapping[str, Any]]:
    """The records of rounds 1..K, oldest first, from any of the forms :func:`suggest_tau` takes."""
    if isinstance(records, Mapping):
        if records and all(isinstance(k, int) for k in records):  # Result.train_metrics_clientapp
            return [records[k] for k in sorted(records)]
        return [records]  # one round's record
    return list(records)


def suggest_tau(records: RoundRecords, quantile: str = "q50", norm: str = "input_norm") -> float:
    """tau from probe rounds: the largest ``{norm}_{quantile}`` of their records (e.g. ``input_norm_q50``).

    Parameters
    ----------
    records
        The probe's rounds 1..K: ``Clip21Strategy.history`` (a list of round
        records), the ``train_metrics_clientapp`` of the Result that
        ``Strategy.start`` returns (a dict round -> MetricRecord, where the
        strategy's keys carry the ``fl_clip21.`` prefix), a list of such
        MetricRecords, or one round's record. A round without the key (no
        accepted reply) is passed over.
    quantile, norm
        Which figure: ``q10``, ``q50``, ``q90`` or ``max`` of ``input_norm``
        (what clip21_mod clips: ||x - y_i - v_i||) or ``update_norm`` (||x - y_i||).
    """
    from fl_clip21.flower.records import PREFIX

    key = f"{norm}_{quantile}"
    if quantile not in QUANTILES or norm not in NORMS:
        raise ValueError(f"quantile must be one of {', '.join(QUANTILES)} and norm input_norm or update_norm, got {key!r}")
    rounds = _rounds(records)
    values = [float(r[k]) for r in rounds for k in (key, PREFIX + key) if k in r]
    if not values:
        raise ValueError(
            f"no round of the {len(rounds)} given has {key!r}: no accepted message reported its norms "
            "(DP noise hides them)"
        )
    value = max(values)
    if not value > 0:
        raise ValueError(f"{key} is {value!r} in every round: every update was zero, there is nothing to clip")
    return value


def calibrate(cfg: dict[str, Any], rounds: int = PROBE_ROUNDS, quantile: str = "q50") -> dict[str, Any]:
    """Update norms of the scenario's unclipped counterpart over ``rounds`` rounds, and the tau they suggest.

    Returns ``{"algorithm": "gd" | "sgd", "rounds": [{"round", "update_norm_q10", ...}], "tau": ...,
    "tau_round": ...}``: tau is the largest ``update_norm_{quantile}`` of the rounds (:func:`suggest_tau`),
    ``tau_round`` the round it comes from.
    """
    from fl_clip21.engine import run_local

    if not 1 <= rounds <= 1000:
        raise ConfigError(f"--rounds must be in 1..1000, got {rounds!r}")
    if quantile not in QUANTILES:
        raise ConfigError(f"--quantile must be one of {', '.join(QUANTILES)}, got {quantile!r}")
    uses_tau = [name for name in cfg["algorithms"] if "tau" in HYPER_KEYS.get(name, ())]
    if not uses_tau:
        raise ConfigError(f"algorithms {cfg['algorithms']} take no tau: there is nothing to calibrate")
    stochastic = any(algorithm_from_config(name, cfg).stochastic for name in uses_tau)
    probe = "sgd" if stochastic else "gd"
    run = run_local({**cfg, "algorithms": [probe], "rounds": rounds}, probe)
    keys = [f"update_norm_{q}" for q in QUANTILES]
    table = [{"round": r["round"], **{k: r[k] for k in keys}} for r in run["records"]]
    tau = suggest_tau(run["records"], quantile, "update_norm")
    tau_round = next(r["round"] for r in table if r[f"update_norm_{quantile}"] == tau)
    return {"algorithm": probe, "rounds": table, "tau": tau, "tau_round": tau_round}


def report(result: Mapping[str, Any], cfg: Mapping[str, Any], quantile: str) -> str:
    """The table and the suggestion, as the command prints them."""
    lines = [
        f"{cfg['name']}: norms of the {cfg['num-clients']} clients' updates ({result['algorithm']}, no clipping)",
        "",
        "| round | q10 | q50 | q90 | max |",
        "|---|---|---|---|---|",
    ]
    for row in result["rounds"]:
        lines.append("| " + " | ".join([str(row["round"])] + [f"{row[f'update_norm_{q}']:.4g}" for q in QUANTILES]) + " |")
    share = {"q10": "about 90%", "q50": "about half", "q90": "about 10%", "max": "none"}[quantile]
    k = len(result["rounds"])
    span = "round 1" if k == 1 else f"rounds 1-{k}"
    lines += [
        "",
        f"suggested tau = {result['tau']:.4g} (the largest {quantile} of {span}, from round {result['tau_round']}: "
        f"clips {share} of that round's updates; the scenario has tau = {cfg['tau']:g})",
        f"  --set tau={result['tau']:.4g}",
    ]
    return "\n".join(lines)
