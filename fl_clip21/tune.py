"""``fl-clip21 tune``: a fair comparison, each algorithm at its own best hyper-parameters.

For every algorithm of the scenario (and every epsilon of its ``target-epsilon``
list, each tuned on its own), every cell of the ``--grid`` runs on the
selection seeds; the cell with the best mean metric (``final_loss`` by default:
lowest; ``final_accuracy``: highest) wins, and the winners run again on
held-out evaluation seeds, whose mean and standard deviation are the result.
A winner on the edge of its grid (the best value of some key is the smallest
or largest tried) is flagged: the grid may not contain the optimum. Cells run
batched on the vectorized engine (:mod:`fl_clip21.cells`).

Outputs: ``tune.csv`` and ``tune.md`` (per algorithm and epsilon: the chosen
cell, its selection score, mean +- std on the evaluation seeds, the edge
flag), ``selection.csv`` (every cell's selection score), ``tune.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from pathlib import Path
from typing import Any

from fl_clip21.algorithms import HYPER_KEYS
from fl_clip21.cells import batch_key, run_cells
from fl_clip21.config import ConfigError, expand_runs, load_scenario, parse_sets
from fl_clip21.outputs import claim
from fl_clip21.sweep import Cell, Grid, grid_cells, parse_grid

METRICS = {"final_loss": min, "final_accuracy": max, "final_grad_norm_sq": min}


def _score(records: list[dict[str, Any]], metric: str) -> float:
    last = records[-1]
    value = last.get(metric.removeprefix("final_"))
    if value is None:
        raise ConfigError(f"--metric {metric}: the runs report no {metric.removeprefix('final_')!r}")
    return float(value)


def _rank(value: float, best) -> float:
    """A score for ``best`` (min or max) to compare: NaN (a diverged run) ranks last."""
    return value if value == value else (float("inf") if best is min else -float("inf"))


def _run(cfgs: list[dict[str, Any]], name: str) -> list[list[dict[str, Any]]]:
    """Each config's records of ``name``, batched where they share a problem."""
    groups: dict[str, list[int]] = {}
    for j, cfg in enumerate(cfgs):
        groups.setdefault(batch_key(cfg, name), []).append(j)
    out: list[Any] = [None] * len(cfgs)
    for members in groups.values():
        for j, res in zip(members, run_cells([cfgs[j] for j in members], name)):
            out[j] = res["records"]
    return out


def _configs(scenario: Path, sets: dict[str, str], cell: Cell, seeds: list[int], eps: float | None) -> list[dict]:
    """One resolved run per seed of ``cell`` (with sigma calibrated to ``eps``)."""
    extra = {"target-epsilon": f"{eps:g}"} if eps is not None else {}
    return [expand_runs(load_scenario(scenario, {**sets, **cell, **extra, "seeds": str(s)}))[0] for s in seeds]


def _on_edge(cell: Cell, grid: Grid, name: str) -> list[str]:
    """The keys ``name`` takes whose chosen value is the first or last of its grid."""
    takes = HYPER_KEYS.get(name, ())
    return [k for k, v in cell.items() if k in takes and len(grid[k]) > 1 and v in (grid[k][0], grid[k][-1])]


def tune(
    scenario: Path, grid: Grid, sets: dict[str, str], selection: list[int], evaluation: list[int], metric: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(winners, every cell's selection score) of every algorithm and epsilon."""
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if set(selection) & set(evaluation):
        raise ConfigError(f"--eval-seeds must differ from --select-seeds, both have {sorted(set(selection) & set(evaluation))}")
    base = load_scenario(scenario, sets)
    epsilons = base["target-epsilon"] or [None]
    cells = grid_cells(grid)
    best = METRICS[metric]
    winners, scores = [], []
    for eps in epsilons:
        cfgs = {tuple(c.items()): _configs(scenario, sets, c, selection, eps) for c in cells}
        for name in base["algorithms"]:
            flat = [cfg for group in cfgs.values() for cfg in group]
            records = _run(flat, name)
            by_cell, k = {}, 0
            for key, group in cfgs.items():
                by_cell[key] = statistics.fmean(_score(r, metric) for r in records[k : k + len(group)])
                k += len(group)
                scores.append({"algorithm": name, "epsilon": eps, **dict(key), metric: by_cell[key]})
            chosen = best(by_cell, key=lambda c: _rank(by_cell[c], best))
            held = [_score(r, metric) for r in _run(_configs(scenario, sets, dict(chosen), evaluation, eps), name)]
            winners.append({
                "algorithm": name, "epsilon": eps, "cell": dict(chosen), "selection": by_cell[chosen],
                "mean": statistics.fmean(held), "std": statistics.stdev(held) if len(held) > 1 else 0.0,
                "eval_seeds": evaluation, "edge": _on_edge(dict(chosen), grid, name),
            })
    return winners, scores


def markdown(winners: list[dict[str, Any]], metric: str, title: str) -> str:
    out = io.StringIO()
    out.write(f"# {title}: tuned\n\n{metric}, mean +- std over the evaluation seeds at each algorithm's best cell "
              "(chosen on the selection seeds). 'edge': the best value of that key is at the end of its grid.\n\n")
    out.write("| algorithm | epsilon | chosen | selection | evaluation | edge |\n|---|---|---|---|---|---|\n")
    for w in winners:
        cell = " ".join(f"{k}={v}" for k, v in w["cell"].items())
        eps = "-" if w["epsilon"] is None else f"{w['epsilon']:g}"
        out.write(f"| {w['algorithm']} | {eps} | {cell} | {w['selection']:.4g} | {w['mean']:.4g} +- {w['std']:.2g} "
                  f"| {', '.join(w['edge']) or '-'} |\n")
    return out.getvalue()


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(out, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else
                        ",".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
    return out.getvalue()


def plot(winners: list[dict[str, Any]], path: Path, metric: str, title: str) -> None:
    """The tuned result of each algorithm (against epsilon when there are several), with its spread."""
    from fl_clip21.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = list(dict.fromkeys(w["algorithm"] for w in winners))
    eps = sorted({w["epsilon"] for w in winners if w["epsilon"] is not None})
    for name in names:
        mine = [w for w in winners if w["algorithm"] == name]
        xs = [w["epsilon"] for w in mine] if eps else [names.index(name)] * len(mine)
        ax.errorbar(xs, [w["mean"] for w in mine], yerr=[w["std"] for w in mine], marker="o", capsize=3, label=name)
    if eps:
        ax.set_xscale("log")
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()
        ax.set_xlabel(r"$\varepsilon$")
    else:
        ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: each algorithm at its best cell")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _seeds(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be integers, got {text!r}") from None
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise ConfigError(f"{what} must be distinct integers >= 0, got {text!r}")
    return values


def cmd_tune(args: argparse.Namespace) -> int:
    """``fl-clip21 tune``: tune every algorithm on the grid, evaluate the winners, write the outputs."""
    grid = parse_grid(args.grid or [])
    if "target-epsilon" in grid or "seed" in grid or "seeds" in grid:
        raise ConfigError("--grid takes hyper-parameters to tune; give epsilons in the scenario's target-epsilon")
    selection, evaluation = _seeds(args.select_seeds, "--select-seeds"), _seeds(args.eval_seeds, "--eval-seeds")
    scenario, sets = Path(args.scenario), parse_sets(args.set or [])
    for cell in grid_cells(grid)[:1] + grid_cells(grid)[-1:]:
        load_scenario(scenario, {**sets, **cell})  # every key and value checked before anything runs
    first = load_scenario(scenario, sets)
    output = claim(Path(args.out) if args.out else None, name=f"{first['name']}-tune",
                   planned=["tune.csv", "tune.md", "selection.csv", "tune.png"], overwrite=args.overwrite)
    with output:
        winners, scores = tune(scenario, grid, sets, selection, evaluation, args.metric)

        def write(folder: Path) -> None:
            (folder / "tune.csv").write_text(_csv(winners))
            (folder / "tune.md").write_text(markdown(winners, args.metric, first["name"]))
            (folder / "selection.csv").write_text(_csv(scores))
            plot(winners, folder / "tune.png", args.metric, first["name"])

        output.write(write)
        written = output.commit()
    print(markdown(winners, args.metric, first["name"]))
    print(output.wrote(written))
    return 0
