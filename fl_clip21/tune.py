"""``fl-clip21 tune``: a fair comparison, each algorithm at its own best hyper-parameters.

For every algorithm of the scenario (and every epsilon of its ``target-epsilon``
list, each tuned on its own), every cell of the ``--grid`` runs on the
selection seeds; the cell with the best mean metric (``final_loss`` by default:
lowest; ``final_accuracy``: highest) wins, and the winners run again on
held-out evaluation seeds, whose mean and standard deviation are the result.
A winner on the edge of its grid (the best value of some key is the smallest
or largest tried) is flagged: the grid may not contain the optimum. Cells run
batched on the vectorized engine (:mod:`fl_clip21.cells`).

Large grids: a cell that differs from another only in keys the algorithm does
not take (clip-sgd has no beta1 or beta2) is the same run, run once
(:func:`run_key`); the cells of a batch are split so that each batch's arrays
fit ``--memory-budget`` (:func:`cell_bytes`; default: half the memory
available when tune starts); only the final round is evaluated, as the
selection reads only final metrics; a line per batch on stderr says how far
it got.

Outputs: ``tune.csv`` and ``tune.md`` (per algorithm and epsilon: the chosen
cell, in the keys the algorithm reads, its selection score, mean +- std on the evaluation seeds, the edge
flag), ``selection.csv`` (every cell's selection score), ``tune.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fl_clip21.algorithms import CENTRAL_DP, DP_FEDAVG, HYPER_KEYS, algorithm_from_config
from fl_clip21.cells import batch_key, run_cells
from fl_clip21.config import ConfigError, expand_runs, load_scenario, parse_sets
from fl_clip21.outputs import claim
from fl_clip21.problems import build_problem
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


def run_key(cfg: dict[str, Any], name: str) -> str:
    """Runs of ``name`` with the same key are the same run: same batch (:func:`batch_key`), same hyper-parameters.

    The algorithm's hyper-parameters are those it takes (``HYPER_KEYS``, and
    the server's noise under central DP), so cells that differ only in other
    keys (clip-sgd's beta1, beta2) share a key.
    """
    return json.dumps([batch_key(cfg, name), algorithm_from_config(name, cfg).hyper], sort_keys=True, default=str)


def cell_bytes(cfg: dict[str, Any], name: str) -> int:
    """Bytes one cell adds to a batch of :func:`fl_clip21.cells.run_cells` (an estimate).

    Its clients' state (``num-clients`` x d per state array), a round's arrays
    of its sampled clients (the model each row is at, their gradients, noise,
    messages and the state rows read and written: 4 + 2 x state arrays of
    sampled x d) and their data rows' activations in the gradient
    computation (the problem's ``row_bytes``, where it has them). The final
    evaluation of the cells' models is not counted.
    """
    problem = build_problem(cfg)
    algorithm = algorithm_from_config(name, cfg)
    n, d, itemsize = cfg["num-clients"], problem.layout.size, problem.layout.dtype.itemsize
    arrays = len(algorithm.client_state)
    sampled = min(n, max(1, math.ceil(cfg["fraction"] * n)))
    sizes = getattr(problem, "sizes", None)
    rows = 0
    if sizes is not None:
        per_client = float(sizes.mean())
        rows = sampled * (min(per_client, cfg["batch-size"]) if algorithm.stochastic else per_client)
    return int(n * d * itemsize * arrays + sampled * d * itemsize * (4 + 2 * arrays)
               + rows * getattr(problem, "row_bytes", 0))


class Progress:
    """A line per batch of cells run: algorithm, epsilon and stage, runs done of the stage's, time so far and left."""

    def __init__(self, stream: TextIO | None):
        self.stream, self.start = stream, time.perf_counter()

    def batch(self, what: str, batch: int, batches: int, done: int, distinct: int, asked: int) -> None:
        """Batch ``batch`` of ``batches`` of a stage finished: ``done`` of its ``distinct`` runs (``asked`` cells x seeds)."""
        if self.stream is None:
            return
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"tune {what}: batch {batch}/{batches}, {done}/{distinct} distinct runs ({asked} asked), "
                          f"{elapsed:.1f} s\n")
        self.stream.flush()


def _run(cfgs: list[dict[str, Any]], name: str, budget: int, progress: Progress, what: str) -> list[list[dict]]:
    """Each config's records of ``name``: each distinct run once, batched where they share a problem, within ``budget``."""
    first: dict[str, int] = {}
    same = [first.setdefault(run_key(cfg, name), j) for j, cfg in enumerate(cfgs)]
    groups: dict[str, list[int]] = {}
    for j in first.values():
        groups.setdefault(batch_key(cfgs[j], name), []).append(j)
    batches = [chunk for members in groups.values() for chunk in _chunks(members, cfgs, name, budget)]
    records: dict[int, list[dict[str, Any]]] = {}
    for b, chunk in enumerate(batches, 1):
        # Only the final round is evaluated: the selection reads final metrics only.
        rounds = cfgs[chunk[0]]["rounds"]
        for j, res in zip(chunk, run_cells([cfgs[j] for j in chunk], name, evaluate_every=rounds)):
            records[j] = res["records"]
        progress.batch(what, b, len(batches), len(records), len(first), len(cfgs))
    return [records[j] for j in same]


def _chunks(members: list[int], cfgs: list[dict[str, Any]], name: str, budget: int) -> list[list[int]]:
    """``members`` (one batch key) in batches whose :func:`cell_bytes` add up to at most ``budget``."""
    each = cell_bytes(cfgs[members[0]], name)
    if each > budget:
        cfg = cfgs[members[0]]
        raise ConfigError(
            f"--memory-budget {_text(budget)} is below the {_text(each)} one cell of {name} takes "
            f"(num-clients={cfg['num-clients']}, fraction={cfg['fraction']!r}); give a larger one"
        )
    size = max(1, budget // each)
    return [members[i : i + size] for i in range(0, len(members), size)]


def _text(nbytes: float) -> str:
    """``nbytes`` in B, kB, MB, GB or TB, 3 significant digits."""
    power = min(4, max(0, int(math.log10(max(nbytes, 1)) // 3)))
    return f"{nbytes / 1000**power:.3g} {('B', 'kB', 'MB', 'GB', 'TB')[power]}"


def _configs(scenario: Path, sets: dict[str, str], cell: Cell, seeds: list[int], eps: float | None) -> list[dict]:
    """One resolved run per seed of ``cell`` (with sigma calibrated to ``eps``)."""
    extra = {"target-epsilon": f"{eps:g}"} if eps is not None else {}
    return expand_runs(load_scenario(scenario, {**sets, **cell, **extra, "seeds": ",".join(map(str, seeds))}))


def _reads(cell: Cell, name: str, dp: str) -> list[str]:
    """The keys of ``cell`` whose value the runs of ``name`` read.

    Its hyper-parameters (``HYPER_KEYS``), ``sigma`` where the server adds
    the noise (as :func:`fl_clip21.algorithms.algorithm_from_config` does it:
    DP-FedAvg, and the clipping family under central DP: ``dp`` unless the
    cell sets it), and every key no
    algorithm takes as a hyper-parameter (rounds, batch-size, ...: the run's
    own). The others (clip-sgd's beta1, dp-fedavg's beta2) change nothing
    (:func:`run_key`), so the chosen cell does not list them.
    """
    if name not in HYPER_KEYS:
        return list(cell)
    takes = set(HYPER_KEYS[name])
    if name in DP_FEDAVG or (cell.get("dp", dp) == "central" and name in CENTRAL_DP):
        takes.add("sigma")
    anyone = {k for keys in HYPER_KEYS.values() for k in keys}
    return [k for k in cell if k in takes or k not in anyone]


def _on_edge(cell: Cell, grid: Grid, name: str, dp: str) -> list[str]:
    """The keys ``name`` reads (:func:`_reads`) whose chosen value is the first or last of its grid."""
    reads = _reads(cell, name, dp)
    return [k for k, v in cell.items() if k in reads and len(grid[k]) > 1 and v in (grid[k][0], grid[k][-1])]


def tune(
    scenario: Path, grid: Grid, sets: dict[str, str], selection: list[int], evaluation: list[int], metric: str,
    memory_budget: int | None = None, stream: TextIO | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(winners, every cell's selection score) of every algorithm and epsilon.

    ``memory_budget``: bytes a batch of cells may take (:func:`cell_bytes`;
    None: half the memory available now). ``stream``: where the progress
    lines go (None: nowhere).
    """
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if set(selection) & set(evaluation):
        raise ConfigError(f"--eval-seeds must differ from --select-seeds, both have {sorted(set(selection) & set(evaluation))}")
    base = load_scenario(scenario, sets)
    budget = memory_budget if memory_budget is not None else default_budget()
    progress = Progress(stream)
    epsilons = base["target-epsilon"] or [None]
    cells = grid_cells(grid)
    best = METRICS[metric]
    winners, scores = [], []
    for eps in epsilons:
        cfgs = {tuple(c.items()): _configs(scenario, sets, c, selection, eps) for c in cells}
        for name in base["algorithms"]:
            at = name if eps is None else f"{name} epsilon={eps:g}"
            flat = [cfg for group in cfgs.values() for cfg in group]
            records = _run(flat, name, budget, progress, f"{at} selection")
            by_cell, k = {}, 0
            for key, group in cfgs.items():
                by_cell[key] = statistics.fmean(_score(r, metric) for r in records[k : k + len(group)])
                k += len(group)
                scores.append({"algorithm": name, "epsilon": eps, **dict(key), metric: by_cell[key]})
            chosen = best(by_cell, key=lambda c: _rank(by_cell[c], best))
            held_cfgs = _configs(scenario, sets, dict(chosen), evaluation, eps)
            held = [_score(r, metric) for r in _run(held_cfgs, name, budget, progress, f"{at} evaluation")]
            cell = dict(chosen)
            winners.append({
                "algorithm": name, "epsilon": eps, "cell": {k: cell[k] for k in _reads(cell, name, base["dp"])},
                "selection": by_cell[chosen],
                "mean": statistics.fmean(held), "std": statistics.stdev(held) if len(held) > 1 else 0.0,
                "eval_seeds": evaluation, "edge": _on_edge(cell, grid, name, base["dp"]),
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


def default_budget() -> int:
    """Half the memory available now: the rest for the problem's data, the evaluation and the other processes."""
    import psutil

    return psutil.virtual_memory().available // 2


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"8GB"``, ``"512 MiB"``, ``"1e9"`` -> bytes; anything else is a ConfigError naming --memory-budget."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) * _UNITS[match.group(2)] < 1:
        raise ConfigError(f"--memory-budget must be a size such as 8GB, 512MiB or 1e9 (bytes), got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


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
    budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
    scenario, sets = Path(args.scenario), parse_sets(args.set or [])
    for cell in grid_cells(grid)[:1] + grid_cells(grid)[-1:]:
        load_scenario(scenario, {**sets, **cell})  # every key and value checked before anything runs
    first = load_scenario(scenario, sets)
    output = claim(Path(args.out) if args.out else None, name=f"{first['name']}-tune",
                   planned=["tune.csv", "tune.md", "selection.csv", "tune.png"], overwrite=args.overwrite)
    with output:
        winners, scores = tune(scenario, grid, sets, selection, evaluation, args.metric, budget, sys.stderr)

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
