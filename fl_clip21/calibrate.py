"""``fl-clip21 calibrate``: choose tau from the norms of the clients' updates.

Clipping at tau clips every client whose update is longer than tau. Clip21's
error feedback removes the bias this causes, but not the slower start: a tau
far below every update makes the first rounds crawl (each client moves its
memory by at most tau a round). So tau is best read off the norms the clients
actually produce. ``calibrate`` runs the scenario's unclipped counterpart (GD,
or SGD for stochastic algorithms) for a few rounds on the in-process engine and
reports, per round, the quantiles of ||update|| over the clients, then suggests
tau at a quantile of the first round's norms (default: the median, which clips
about half the clients at the start).

A Flower app reads the same figures from its own run: every round's metrics
carry ``update_norm_q10 ... update_norm_max`` and ``input_norm_*`` (the norms
clip21_mod sees), and :func:`suggest_tau` turns a round's record into tau.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fl_clip21.algorithms import HYPER_KEYS, algorithm_from_config
from fl_clip21.config import ConfigError

QUANTILES = {"q10": 0.1, "q50": 0.5, "q90": 0.9, "max": 1.0}


def suggest_tau(record: Mapping[str, Any], quantile: str = "q50", norm: str = "input_norm") -> float:
    """tau from a round's record: its ``{norm}_{quantile}`` (e.g. ``input_norm_q50``).

    ``record`` is a round of ``Clip21Strategy.history`` or the round's train
    MetricRecord of the Result that ``start`` returns (``result.train_metrics_clientapp[1]``),
    where the strategy's own keys carry the ``fl_clip21.`` prefix.
    """
    from fl_clip21.flower.records import PREFIX

    key = f"{norm}_{quantile}"
    if quantile not in QUANTILES or norm not in ("input_norm", "update_norm"):
        raise ValueError(f"quantile must be one of {', '.join(QUANTILES)} and norm input_norm or update_norm, got {key!r}")
    if key not in record and PREFIX + key in record:
        key = PREFIX + key
    if key not in record:
        raise ValueError(f"the record has no {key!r}: no accepted message reported its norms (DP noise hides them)")
    value = float(record[key])
    if not value > 0:
        raise ValueError(f"{key} is {value!r}: every update was zero, there is nothing to clip")
    return value


def calibrate(cfg: dict[str, Any], rounds: int = 1, quantile: str = "q50") -> dict[str, Any]:
    """Update norms of the scenario's unclipped counterpart and the tau they suggest.

    Returns ``{"algorithm": "gd" | "sgd", "rounds": [{"round", "update_norm_q10", ...}], "tau": ...}``.
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
    return {"algorithm": probe, "rounds": table, "tau": suggest_tau(run["records"][0], quantile, "update_norm")}


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
    lines += [
        "",
        f"suggested tau = {result['tau']:.4g} (the {quantile} of round 1: clips {share} of the first round's "
        f"updates; the scenario has tau = {cfg['tau']:g})",
        f"  --set tau={result['tau']:.4g}",
    ]
    return "\n".join(lines)
