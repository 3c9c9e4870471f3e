"""The fault protocol that keeps g = mean(v_i), and the per-round record: written once, for every engine.

docs/algorithms.md, "Keeping g = mean(v_i) through faults" and "The per-round record".

Every client asked in a round ends it one of four ways: *accepted* (its
increment c_i is applied: to the server's step and to the server's copy of its
memory, copy_i += c_i), *rejected* (its reply failed a check), *failed* (its
reply was lost, came later than the round timeout, or was an error) or
*needs resync* (it lost its memory and asked for the server's copy). A client
asked whose increment was not applied is *resynced* (:func:`resync_due`): its
memory becomes copy_i before it works again. So copy_i is the sum of client
i's applied increments, g moves by the mean of the applied ones, and
g = mean(copy_i) = mean(v_i) whatever was lost.

The engines keep the copies in their own storage and apply this one rule:

- the Flower strategy keeps them in a file, one client at a time
  (:mod:`fl_clip21.copies`, :mod:`fl_clip21.flower.protocol`), and sends the
  resync with the client's next message;
- the batched engines (:mod:`fl_clip21.engine`, :mod:`fl_clip21.cells`) keep
  them as an array of rows on their backend and resync the rows at once
  (:func:`settle_rows`). A memory is not read before its client's next round,
  so both give the same trajectory.

Each engine's record of a round comes from :func:`round_record` (the batched
engines through :func:`batch_record`): the same fields, defined once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fl_clip21 import backend
from fl_clip21.algorithms import Algorithm
from fl_clip21.privacy import central_epsilon, epsilon

# --- the resync rule --------------------------------------------------------------


def resync_due(asked: Iterable[int], applied: Iterable[int], pending: Iterable[int] = ()) -> set[int]:
    """The clients to resync before they next work, after a round.

    Those ``asked`` this round or still ``pending`` (due a resync from an
    earlier round) whose increment was not ``applied`` this round: each may
    hold an increment the server never applied (a lost, late, rejected or
    duplicated reply), or no memory at all.
    """
    return (set(asked) | set(pending)) - set(applied)


def new_copies(algorithm: Algorithm, rows: int, d: int, dtype, xp: backend.Backend, drops: bool) -> Any:
    """The batched engines' copies of ``rows`` client memories (all zero, as the memories start).

    None when the algorithm keeps no memory or no reply can be lost
    (``drops`` False): every increment is then applied and there is nothing
    to resync to.
    """
    return xp.zeros((rows, d), dtype) if algorithm.memory is not None and drops else None


def settle_rows(memory: Any, copies: Any, rows: np.ndarray, messages: Any, applied: np.ndarray) -> Any:
    """End a round of the batch ``rows`` (indices into ``memory`` and ``copies``): the protocol on rows.

    ``messages`` are the rows' increments (one per entry of ``rows``),
    ``applied`` (a host bool mask over them) those the server applies. The
    applied increments go into their rows' copies; every other row is due a
    resync (the rule of :func:`resync_due`, on a mask: no Python set of 10^5
    rows) and its memory becomes its copy at once. Returns
    the applied messages, for the server's step. ``memory`` and ``copies``
    ((rows, d) arrays of one backend, or None for an algorithm that keeps no
    memory) are changed in place.
    """
    xp = backend.of(messages)
    everyone = bool(applied.all())
    kept = messages if everyone else messages[xp.asarray(applied)]
    if not everyone and memory is not None:
        if copies is None:
            raise ValueError(
                f"{int((~applied).sum())} of {len(applied)} increments were not applied and there are no copies "
                f"to resync their clients to (new_copies with drops=True keeps them)"
            )
        dropped = xp.asarray(rows[~applied])
        memory[dropped] = copies[dropped]
    if copies is not None:
        copies[xp.asarray(rows if everyone else rows[applied])] += kept
    return kept


# --- the record -------------------------------------------------------------------

NORM_QUANTILES = (("q10", 10.0), ("q50", 50.0), ("q90", 90.0), ("max", 100.0))
_QUANTILES = np.array([q for _, q in NORM_QUANTILES])


def reports_norms(algorithm: Algorithm) -> bool:
    """Whether clients report their norms: never with DP noise (an unclipped norm is not private)."""
    return algorithm.noise_multiplier is None


def _percentiles(values: np.ndarray, axis: int) -> np.ndarray:
    """``np.percentile(values, [q for _, q in NORM_QUANTILES], axis)``, equal to it, from one sort.

    The same linear interpolation as numpy's default method (its two-sided
    lerp included), without its per-call overhead: a round's record computes
    these every round, and at d = 31 numpy's generic quantile took a fifth of a
    round of 1000 clients.
    """
    ordered = np.moveaxis(np.sort(values, axis=axis), axis, 0)
    n = ordered.shape[0]
    index = (n - 1) * (_QUANTILES / 100.0)
    lo = np.floor(index).astype(np.int64)
    hi, t = np.minimum(lo + 1, n - 1), (index - lo).reshape((-1,) + (1,) * (ordered.ndim - 1))
    a, b = ordered[lo], ordered[hi]
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def norm_quantiles(norms: Sequence[tuple[float, float]] | np.ndarray) -> dict[str, float]:
    """Quantiles (10/50/90/max) of the accepted messages' ``(update, operator input)`` norms.

    ``update_norm_*``: the norm of the update the client computed (gradient,
    momentum or model update); ``input_norm_*``: of what the operator clipped
    (Clip21: ||grad - v_i||). Empty when there are no norms.
    """
    if not len(norms):
        return {}
    table = _percentiles(np.asarray(norms, dtype=np.float64), axis=0)
    return {
        f"{name}_{suffix}": float(table[i, j])
        for j, name in enumerate(("update_norm", "input_norm"))
        for i, (suffix, _) in enumerate(NORM_QUANTILES)
    }


def norm_quantiles_by_group(norms: np.ndarray, group: np.ndarray, groups: int) -> list[dict[str, float]]:
    """:func:`norm_quantiles` of the rows of each group (rows sorted by group), one percentile call when sizes agree."""
    counts = np.bincount(group, minlength=groups)
    if counts.size and counts.min() == counts.max() > 0:
        table = _percentiles(norms.reshape(groups, counts[0], 2), axis=1)
        return [
            {f"{name}_{suffix}": float(table[i, g, j]) for j, name in enumerate(("update_norm", "input_norm"))
             for i, (suffix, _) in enumerate(NORM_QUANTILES)}
            for g in range(groups)
        ]
    return [norm_quantiles(norms[group == g]) for g in range(groups)]


def round_epsilon(algorithm: Algorithm, times_asked: np.ndarray, delta: float, server_round: int) -> dict[str, float]:
    """``{"epsilon": ..., "noise_multiplier": z}`` after ``server_round`` rounds, for algorithms with DP noise.

    z is the multiplier the accountant uses (:mod:`fl_clip21.privacy`). Local DP: of the most-asked client (every
    round it was asked counts, whatever became of its reply). Central DP: of every client, over all rounds so far,
    with amplification by Poisson subsampling where the clients were Poisson-sampled.
    """
    if algorithm.noise_multiplier is None:
        return {}
    z = algorithm.noise_multiplier  # the accountant's: sigma over the sensitivity of the adjacency claimed
    if algorithm.central is not None:
        rate = algorithm.hyper.get("sampling-rate", 1.0)
        return {"epsilon": central_epsilon(z, server_round, delta, rate), "noise_multiplier": z}
    return {"epsilon": epsilon(z, int(times_asked.max()), delta), "noise_multiplier": z}


def message_bytes(algorithm: Algorithm, d: int, dtype) -> int:
    """Bytes of values one message carries: d dense values, or Top-k's k indices and k values.

    The Flower client sends the same bytes (:func:`fl_clip21.flower.records.encode_sparse`).
    """
    itemsize = np.dtype(dtype).itemsize
    if algorithm.sparse:
        return algorithm.sparse_entries(d) * ((4 if d < 2**31 else 8) + itemsize)
    return d * itemsize


def round_record(
    server_round: int, algorithm: Algorithm, *, participants: int, accepted: int, clipped: int, rejected: int = 0,
    failed: int = 0, resyncs: int = 0, bytes_up: int, seconds: float, times_asked: np.ndarray, delta: float,
    norms: Sequence[tuple[float, float]] | np.ndarray = (), quantiles: Mapping[str, float] | None = None,
    audit: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The record of round ``server_round`` of ``algorithm``, but for the model's metrics (the engine adds them).

    ``participants``: the clients sampled; of their replies ``accepted``
    (applied), ``rejected``, ``failed`` (lost, late or an error), ``resyncs``
    (asked for the server's copy instead of working); ``clipped`` of the
    accepted had their operator active; ``bytes_up`` of message values came in.
    ``times_asked`` counts each client's rounds asked, for the epsilon of
    algorithms with DP noise (:func:`round_epsilon`). The accepted messages'
    ``norms`` give the quantiles (:func:`norm_quantiles`), or ``quantiles``
    given, for algorithms whose clients report them (:func:`reports_norms`).
    ``audit`` (audited runs): ``invariant_gap`` and ``memory_gap``.
    """
    record: dict[str, Any] = {
        "round": server_round,
        "participants": participants,
        "accepted": accepted,
        "clip_fraction": clipped / accepted if accepted else 0.0,
        "rejected": rejected,
        "failed": failed,
        "resyncs": resyncs,
        "bytes_up": bytes_up,
        "seconds": seconds,
    }
    if audit is not None:
        record.update(audit)
    record.update(round_epsilon(algorithm, times_asked, delta, server_round))
    if reports_norms(algorithm):
        record.update(quantiles if quantiles is not None else norm_quantiles(norms))
    return record


def batch_record(
    server_round: int, algorithm: Algorithm, *, applied: np.ndarray, active: np.ndarray, norms: np.ndarray | None,
    d: int, dtype, seconds: float, times_asked: np.ndarray, delta: float,
    quantiles: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """:func:`round_record` of a batched engine's round, from its sampled rows (host arrays, one entry per row).

    ``applied``: the rows whose reply came in time (the others failed: late);
    ``active`` and ``norms`` ((m, 2), None when not reported): every row's, as
    the algorithm's client function gave them. A batched engine rejects no
    reply and loses no client memory: ``rejected`` and ``resyncs`` are 0.
    """
    accepted = int(applied.sum())
    if quantiles is None and norms is not None and reports_norms(algorithm):
        quantiles = norm_quantiles(norms[applied])
    return round_record(
        server_round, algorithm, participants=len(applied), accepted=accepted, clipped=int(active[applied].sum()),
        failed=len(applied) - accepted, bytes_up=accepted * message_bytes(algorithm, d, dtype), seconds=seconds,
        times_asked=times_asked, delta=delta, quantiles=quantiles,
    )
