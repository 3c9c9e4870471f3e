"""Aggregating the metrics clients report (train and evaluate), as FedAvg does, without trusting them.

FedAvg averages every key of the replies' MetricRecords weighted by
``num-examples``. Here the same average, but a client's metrics cannot stop
the server: a record without a usable weight (missing, not a finite number
> 0) makes the round's average unweighted, a value that is not finite or a
list whose length differs from the others' is left out (logged), and a key
some clients do not send is averaged over those that send it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import WARNING

from flwr.supercore import log

WEIGHT = "num-examples"


def _number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _clean(value: object) -> float | list[float] | None:
    if _number(value):
        return float(value)
    if isinstance(value, list) and value and all(_number(v) for v in value):
        return [float(v) for v in value]
    return None


def aggregate(records: Sequence[Mapping[str, object]], weight_key: str = WEIGHT) -> dict[str, float | list[float]]:
    """The weighted mean of every key of ``records`` (dicts of a MetricRecord's items).

    Weighted by ``weight_key`` when every record has a finite value > 0 for
    it, else unweighted; the weight key itself is left out, as FedAvg does.
    """
    if not records:
        return {}
    weights = [r.get(weight_key) for r in records]
    weighted = all(_number(w) and w > 0 for w in weights)
    w = [float(x) for x in weights] if weighted else [1.0] * len(records)
    sums: dict[str, float | list[float]] = {}
    totals: dict[str, float] = {}
    for record, weight in zip(records, w):
        for key, raw in record.items():
            if key == weight_key:
                continue
            value = _clean(raw)
            current = sums.get(key)
            if value is None or (current is not None and isinstance(value, list) != isinstance(current, list)) or (
                isinstance(value, list) and isinstance(current, list) and len(value) != len(current)
            ):
                log(WARNING, "client metric %r: left out a value that does not average (%.60r)", key, raw)
                continue
            if isinstance(value, list):
                sums[key] = [c + weight * v for c, v in zip(current or [0.0] * len(value), value)]
            else:
                sums[key] = (current or 0.0) + weight * value
            totals[key] = totals.get(key, 0.0) + weight
    out: dict[str, float | list[float]] = {}
    for key, total in sums.items():
        mean = [v / totals[key] for v in total] if isinstance(total, list) else total / totals[key]
        if all(math.isfinite(v) for v in (mean if isinstance(mean, list) else [mean])):
            out[key] = mean
        else:  # finite values whose weighted sum overflows
            log(WARNING, "client metric %r: its average overflows, left out", key)
    return out
