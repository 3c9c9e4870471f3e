"""Outputs of a run: metrics, resolved config, summary table and plots.

One run (a scenario with one epsilon and one seed) writes ``metrics.json``,
``config.json``, ``final_params.npz`` (the final model of each algorithm, keys
``ALGORITHM/ARRAY``), ``convergence.png``, ``loss.png``, ``bytes.png`` and, for
classification problems, ``accuracy.png``. Every invocation also writes
``summary.md`` / ``summary.csv`` (one row per algorithm, or per algorithm and
epsilon for a ``target-epsilon`` grid, averaged over seeds) and, for DP grids,
``accuracy_vs_epsilon.png``.

Every plot is titled with the scenario's name, the problem and its data, n
(``num-clients``), tau and the step size gamma (``lr``), and epsilon (or sigma)
for noisy runs: ``logreg-nonconvex — logreg on breast_cancer, n=10, τ=0.1, γ=1``
(:func:`plot_title`); a run of a grid adds its seed.

``loss.png`` follows one rule (:func:`loss_view`). Let f_min be the lowest loss
any algorithm of the run reached and span the range of all its losses. When at
least a quarter of all (algorithm, round) points lie within 1% of span of f_min
(some algorithm converges, or the curves meet), the plot shows f − f_best on a
log axis, where f_best = f_min − 1e-12 · max(span, |f_min|): the margin keeps the
best point on the axis, and differences below it are the rounding of f, not
progress. Otherwise (the curves stay apart, as noisy or unconverged runs do) it
shows f itself on a linear axis, where a narrow range still gets its ticks.

``accuracy_vs_epsilon.png`` has its x ticks at the grid's epsilons and draws
the chance level (:func:`chance_accuracy`, 1 / the number of classes of the
problem) as a dashed line labelled "chance".
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

Records = list[dict[str, Any]]


def rounds_to_target(records: Records, target: float) -> int | None:
    """First round whose grad_norm_sq is <= target (None: never)."""
    for rec in records:
        if rec["grad_norm_sq"] <= target:
            return int(rec["round"])
    return None


def bytes_to_target(records: Records, target: float) -> int | None:
    """Bytes sent up until the first round whose grad_norm_sq is <= target."""
    total = 0
    for rec in records:
        total += rec["bytes_up"]
        if rec["grad_norm_sq"] <= target:
            return total
    return None


def summarize(records: Records, target: float, wall_seconds: float) -> dict[str, Any]:
    """The summary row of one algorithm's run."""
    last = records[-1]
    acc = [r["accuracy"] for r in records if "accuracy" in r]
    return {
        "final_loss": last["loss"],
        "best_accuracy": max(acc) if acc else None,
        "final_accuracy": acc[-1] if acc else None,
        "final_grad_norm_sq": last["grad_norm_sq"],
        "rounds_to_target": rounds_to_target(records, target),
        "bytes_to_target": bytes_to_target(records, target),
        "epsilon": last.get("epsilon"),
        "noise_multiplier": last.get("noise_multiplier"),
        "bytes_up": sum(r["bytes_up"] for r in records),
        "wall_seconds": wall_seconds,
    }


COLUMNS = [
    "algorithm", "epsilon", "seeds", "noise_multiplier", "final_loss", "best_accuracy", "final_accuracy",
    "final_grad_norm_sq", "rounds_to_target", "bytes_to_target", "bytes_up", "wall_seconds",
]


def _mean(values: list[Any]) -> Any:
    """Mean over seeds; None when any seed has None (e.g. never reached the target)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


def aggregate_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows averaged over seeds, one per (algorithm, target epsilon)."""
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for run in runs:
        for name, row in run["rows"].items():
            groups.setdefault((name, run["target_epsilon"]), []).append(row)
    out = []
    for (name, eps), rows in groups.items():
        row = {"algorithm": name, "seeds": len(rows)}
        for col in COLUMNS[3:]:
            row[col] = _mean([r[col] for r in rows])
        reported = [r["epsilon"] for r in rows]
        row["epsilon"] = max(reported) if all(e is not None for e in reported) else None
        row["target_epsilon"] = eps
        out.append(row)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


# What the summary says of a run whose DP noise came from OS entropy (secure-noise).
SECURE_NOISE_NOTE = (
    "The DP noise (and Poisson sampling) came from OS entropy (secure-noise = true): the seed does not "
    "reproduce this run's trajectory."
)


def summary_markdown(rows: list[dict[str, Any]], title: str, target: float, secure_noise: bool = False) -> str:
    """The summary table; ``noise_multiplier`` is the one the accountant used (docs/algorithms.md, Privacy)."""
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    out = io.StringIO()
    out.write(f"# {title}\n\nTarget: grad_norm_sq <= {target:g}. Means over seeds; '-': none (not reached, not private, not a classifier).\n\n")
    if secure_noise:
        out.write(SECURE_NOISE_NOTE + "\n\n")
    out.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
    for r in rows:
        out.write("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |\n")
    return out.getvalue()


def summary_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=[*COLUMNS, "target_epsilon"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return out.getvalue()


# --- progress -----------------------------------------------------------------


def progress_line(name: str, rec: dict[str, Any], rounds: int) -> str:
    """``[clip21-gd] round 30/100  loss=0.2522  grad_norm_sq=7.026e-13``, with epsilon, rejected, failed when set."""
    eps = f"  epsilon={rec['epsilon']:.3g}" if "epsilon" in rec else ""
    line = (
        f"[{name}] round {rec['round']}/{rounds}  loss={rec['loss']:.6g}  "
        f"grad_norm_sq={rec['grad_norm_sq']:.3e}{eps}"
    )
    if rec.get("rejected"):
        line += f"  rejected={rec['rejected']}"
    if rec.get("failed"):
        line += f"  failed={rec['failed']}"
    return line


def progress_due(k: int, rounds: int) -> bool:
    """Whether a log shows round ``k``: every tenth of the run, and the last round."""
    return k == rounds or k % max(1, rounds // 10) == 0


# --- plots --------------------------------------------------------------------

# Classes of the built-in classifiers: LogReg refuses data without exactly two,
# and DigitsMLP's output layer has one unit per digit.
CLASSES = {"logreg": 2, "mlp": 10}

# loss.png: f - f_best on a log axis when at least LOSS_NEAR_SHARE of the points are
# within LOSS_NEAR of the range from the lowest loss (see the module docstring).
LOSS_NEAR = 0.01
LOSS_NEAR_SHARE = 0.25
LOSS_MARGIN = 1e-12


def problem_text(cfg: dict[str, Any]) -> str:
    """The problem and its data, for titles: ``logreg on breast_cancer``, ``mean-estimation, d=10``."""
    name = cfg["problem.name"]
    if name == "logreg":
        return f"logreg on {Path(cfg['problem.dataset']).name}"
    if name == "mlp":
        return "mlp on digits"  # DigitsMLP takes problem.dataset digits (or its default) and trains on digits
    if name == "mean-estimation":
        centers = cfg.get("problem.centers")
        if isinstance(centers, str):
            return f"mean-estimation on {Path(centers).name}"
        # Inline centres are n rows of d numbers (the problem checks them); unset: drawn in problem.dim.
        return f"mean-estimation, d={len(centers[0]) if centers else cfg['problem.dim']}"
    return name


def plot_title(cfg: dict[str, Any], *, seed: bool = False, leave_out: Iterable[str] = ()) -> str:
    """``NAME — PROBLEM, n=10, τ=0.1, γ=1`` (``, ε=3`` for one target epsilon, ``, σ=...`` for noise).

    Parameters
    ----------
    cfg:
        A resolved scenario; one run of a grid has a single ``target-epsilon``.
    seed:
        Add ``, seed S`` (a run of a grid).
    leave_out:
        Keys whose value the plot itself varies (a sweep's grid keys).
    """
    skip = set(leave_out)
    parts = [problem_text(cfg)]
    for key, symbol in (("num-clients", "n"), ("tau", "τ"), ("lr", "γ")):
        if key not in skip:
            parts.append(f"{symbol}={cfg[key]:g}")
    eps = cfg.get("target-epsilon") or []
    if len(eps) == 1 and "target-epsilon" not in skip:
        parts.append(f"ε={eps[0]:g}")
    elif not eps and cfg.get("sigma", 0) > 0 and "sigma" not in skip:
        parts.append(f"σ={cfg['sigma']:g}")
    if seed:
        parts.append(f"seed {cfg['seed']}")
    return f"{cfg['name']} — {', '.join(parts)}"


def chance_accuracy(cfg: dict[str, Any]) -> float | None:
    """1 / the number of classes of a built-in classifier (digits MLP 0.1, logreg 0.5); None otherwise."""
    classes = CLASSES.get(cfg["problem.name"])
    return 1.0 / classes if classes else None


def loss_view(series: dict[str, Records]) -> float | None:
    """f_best for a plot of f − f_best on a log axis, or None for f on a linear axis (module docstring)."""
    losses = np.array([r["loss"] for recs in series.values() for r in recs], dtype=float)
    losses = losses[np.isfinite(losses)]
    if losses.size == 0:
        return None
    low, span = float(losses.min()), float(np.ptp(losses))
    if span == 0 or np.mean(losses - low <= LOSS_NEAR * span) < LOSS_NEAR_SHARE:
        return None
    return low - LOSS_MARGIN * max(span, abs(low))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_ticks(ax) -> None:
    """At least four labels on a log y axis: 1-9 of each decade under one decade, 1, 2, 5 under three.

    Matplotlib labels only the powers of 10, which leaves one to three labels on such axes.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = ax.get_ylim()
    decades = math.log10(high / low) if low > 0 else math.inf
    if decades < 3:
        subs = tuple(range(1, 10)) if decades < 1 else (1, 2, 5)
        ax.yaxis.set_major_locator(LogLocator(subs=subs))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _finish(plt, fig, ax, path: Path, title: str):
    """Title, grid, legend; save to ``path``, free the figure and return it (for tests to read)."""
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_lines(
    series: dict[str, Records], x: str, y: str, path: Path, title: str, log_y: bool, ylabel: str | None = None
):
    """One line per algorithm of ``y`` against ``x`` (``bytes`` = cumulative bytes up); returns the Figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, records in series.items():
        if not records or y not in records[0]:
            continue
        if x == "bytes":
            xs, total = [], 0
            for r in records:
                total += r["bytes_up"]
                xs.append(total)
        else:
            xs = [r[x] for r in records]
        ys = [max(r[y], 1e-300) if log_y else r[y] for r in records]
        ax.plot(xs, ys, label=name)
    if log_y:
        ax.set_yscale("log")
        _log_ticks(ax)
    ax.set_xlabel("bytes sent up (all clients)" if x == "bytes" else x)
    ax.set_ylabel(ylabel or {"grad_norm_sq": r"$\|\nabla f(x)\|^2$"}.get(y, y))
    return _finish(plt, fig, ax, path, title)


def plot_loss(series: dict[str, Records], path: Path, title: str):
    """Loss against round: f − f_best on a log axis or f on a linear one (:func:`loss_view`); returns the Figure."""
    f_best = loss_view(series)
    if f_best is None:
        return plot_lines(series, "round", "loss", path, title, log_y=False, ylabel="loss f(x)")
    gaps = {name: [{"round": r["round"], "loss": r["loss"] - f_best} for r in recs] for name, recs in series.items()}
    return plot_lines(
        gaps, "round", "loss", path, title, log_y=True,
        ylabel=f"f(x) − f_best (log scale)\nf_best = {f_best:.6g}, the run's lowest loss",
    )


def plot_accuracy_vs_epsilon(rows: list[dict[str, Any]], path: Path, title: str, chance: float | None = None):
    """Final accuracy against target epsilon, ticks at the grid's epsilons; returns the Figure."""
    from matplotlib.ticker import NullLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_algo: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["target_epsilon"] is not None and r.get("final_accuracy") is not None:
            by_algo.setdefault(r["algorithm"], []).append((r["target_epsilon"], r["final_accuracy"]))
    for name, pts in by_algo.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if chance is not None:
        ax.axhline(chance, color="0.4", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log")
    epsilons = sorted({p[0] for pts in by_algo.values() for p in pts})
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.xaxis.set_minor_locator(NullLocator())  # log-scale minor ticks would label 2x10^0, 4x10^0, ...
    ax.set_xlabel(r"target $\varepsilon$")
    ax.set_ylabel("test accuracy (final round)")
    return _finish(plt, fig, ax, path, title)


# --- writing ------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_run(
    folder: Path, cfg: dict[str, Any], results: dict[str, dict[str, Any]], grid: bool = False
) -> dict[str, Any]:
    """Write one run's metrics, config and plots into ``folder``; return its summary rows.

    ``grid``: the run is one of several (its plots' titles name its seed).
    """
    folder.mkdir(parents=True, exist_ok=True)
    per_algo = {name: res["records"] for name, res in results.items()}
    metrics = {
        "scenario": cfg["name"],
        "algorithms": {
            name: [{k: _jsonable(v) for k, v in rec.items()} for rec in recs] for name, recs in per_algo.items()
        },
        "wall_seconds": {name: res["wall_seconds"] for name, res in results.items()},
        # Rounds restored from a checkpoint (fl-clip21 run --resume); 0 for a run from round 1.
        "resumed_from_round": {name: int(res.get("resumed_from_round", 0)) for name, res in results.items()},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
    np.savez(
        folder / "final_params.npz",
        **{f"{name}/{key}": arr for name, res in results.items() for key, arr in res["params"].items()},
    )
    title = plot_title(cfg, seed=grid)
    plot_lines(per_algo, "round", "grad_norm_sq", folder / "convergence.png", title, log_y=True)
    plot_loss(per_algo, folder / "loss.png", title)
    plot_lines(per_algo, "bytes", "grad_norm_sq", folder / "bytes.png", title, log_y=True)
    if any("accuracy" in recs[0] for recs in per_algo.values() if recs):
        plot_lines(per_algo, "round", "accuracy", folder / "accuracy.png", title, log_y=False)
    return {name: summarize(res["records"], cfg["target"], res["wall_seconds"]) for name, res in results.items()}


RUN_FILES = (
    "metrics.json", "config.json", "final_params.npz", "convergence.png", "loss.png", "bytes.png", "accuracy.png",
)
SUMMARY_FILES = ("summary.md", "summary.csv", "accuracy_vs_epsilon.png")


def run_folder(cfg: dict[str, Any], grid: bool) -> str:
    """Where a run writes, relative to the output folder: itself, or ``eps-E/seed-S`` (``run/seed-S``) in a grid."""
    if not grid:
        return ""
    eps = cfg["target-epsilon"][0] if cfg.get("target-epsilon") else None
    return f"{f'eps-{eps:g}' if eps is not None else 'run'}/seed-{cfg['seed']}"


def output_paths(cfgs: list[dict[str, Any]]) -> list[str]:
    """Every file :func:`write_outputs` may write for these runs (the plots a run may skip included)."""
    grid = len(cfgs) > 1
    runs = [f"{run_folder(cfg, grid)}/{name}".lstrip("/") for cfg in cfgs for name in RUN_FILES]
    return [*runs, *SUMMARY_FILES]


def write_outputs(folder: Path, runs: list[tuple[dict[str, Any], dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Write every run into ``folder`` (an empty folder); return the summary rows.

    ``runs`` are ``(cfg, results)`` pairs. A single run writes its files into
    ``folder`` itself; a grid writes ``folder/eps-E/seed-S/`` per run. The
    folder is a staging folder (:mod:`fl_clip21.outputs`), moved into place once
    everything is written.
    """
    folder = Path(folder)
    summaries = []
    for cfg, results in runs:
        eps = cfg["target-epsilon"][0] if cfg.get("target-epsilon") else None
        rows = write_run(folder / run_folder(cfg, len(runs) > 1), cfg, results, grid=len(runs) > 1)
        summaries.append({"target_epsilon": eps, "rows": rows})
    rows = aggregate_rows(summaries)
    cfg0 = runs[0][0]
    (folder / "summary.md").write_text(
        summary_markdown(rows, cfg0["name"], cfg0["target"], bool(cfg0.get("secure-noise", False)))
    )
    (folder / "summary.csv").write_text(summary_csv(rows))
    if any(r["target_epsilon"] is not None for r in rows):
        seeds = sorted({cfg["seed"] for cfg, _ in runs})
        title = plot_title(cfg0, leave_out=["target-epsilon"])
        if len(seeds) > 1:
            title += f", mean over seeds {', '.join(map(str, seeds))}"
        plot_accuracy_vs_epsilon(rows, folder / "accuracy_vs_epsilon.png", title, chance_accuracy(cfg0))
    return rows
