"""``fl-clip21 sweep``: every algorithm of a scenario over a grid of scenario values.

``--grid tau=0.01,0.1,1 --grid lr=0.1,1`` runs the product of the values of
every ``--grid`` key (any scenario key), with ``--set`` applied to every cell.
Every cell is resolved and checked before anything runs, and the output folder
(``--out``, else a new folder under ``results/``) is claimed. Outputs:

- ``sweep.csv`` / ``sweep.md``: one row per cell and algorithm: the grid values,
  rounds_to_target, final_grad_norm_sq, final_loss (means over the scenario's
  seeds; rounds_to_target is empty when some seed never reached the target);
- ``heatmap-ALGORITHM.png``: two heat maps side by side over the grid, the
  first key on the y axis and the second on the x axis (a 1-D grid is a single
  row; further keys give one row of panels per combination of their values):
  rounds to target (grey: not reached), and the final grad_norm_sq on a log
  colour scale, so a cell that never reaches the target shows how far it got
  (the target is the line on its colour bar). Titled with the algorithm and the
  scenario's values that the grid does not vary
  (:func:`fl_clip21.report.plot_title`).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fl_clip21.config import ConfigError, check_work, expand_runs, load_scenario, parse_sets
from fl_clip21.engine import OnRound, check_flower, check_vectorized
from fl_clip21.outputs import claim
from fl_clip21.problems import build_problem
from fl_clip21.report import plot_title, progress_due, rounds_to_target

Grid = dict[str, list[str]]  # key -> its values, as typed on the command line
Cell = dict[str, str]  # key -> one value

METRICS = ["rounds_to_target", "final_grad_norm_sq", "final_loss"]
NOT_REACHED = "not reached"
NOT_REACHED_COLOUR = "#d0d0d0"


def parse_grid(items: list[str]) -> Grid:
    """``["tau=0.1,1", "lr=0.5"]`` -> ``{"tau": ["0.1", "1"], "lr": ["0.5"]}`` (syntax only)."""
    grid: Grid = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid takes KEY=V1,V2,..., got {item!r}")
        values = [v.strip() for v in text.split(",")]
        if not text.strip() or not all(values):
            raise ConfigError(f"--grid {key} needs comma-separated non-empty values, got {text!r}")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key} names a value twice, got {text!r}")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice")
        if key == "algorithms":
            raise ConfigError(
                f"--grid algorithms={text}: every cell runs every algorithm of the scenario; "
                "choose them with --set algorithms=..."
            )
        grid[key] = values
    if not grid:
        raise ConfigError("sweep needs at least one --grid KEY=V1,V2,...")
    return grid


def grid_cells(grid: Grid) -> list[Cell]:
    """Every combination of the grid's values, the first key varying slowest."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def _cell_text(cell: Cell) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items())


def resolve_cells(
    scenario: Path, grid: Grid, sets: dict[str, str], engine: str = "vectorized"
) -> list[tuple[Cell, list[dict[str, Any]]]]:
    """Every cell's resolved runs (one per seed), or :class:`ConfigError` naming the key and value.

    Each grid value is checked alone first, so an error names the one that is
    wrong; then every cell, so combinations that do not fit are caught too (the
    data of every problem, and algorithms the engine cannot run, included),
    before anything runs.
    """
    both = sorted(set(grid) & set(sets))
    if both:
        raise ConfigError(f"{both[0]} is both a --grid key and a --set key; give it once")
    for key, values in grid.items():
        for value in values:
            try:
                load_scenario(scenario, {**sets, key: value})
            except ConfigError as e:
                raise ConfigError(f"--grid {key}={value}: {e}") from None
    out = []
    for cell in grid_cells(grid):
        try:
            cfg = load_scenario(scenario, {**sets, **cell})
            runs = expand_runs(cfg)
            if len(cfg["target-epsilon"] or []) > 1:
                raise ConfigError(
                    f"target-epsilon has {len(cfg['target-epsilon'])} values in one cell; "
                    "sweep them with --grid target-epsilon=..."
                )
            if engine == "vectorized":
                check_vectorized(cfg)
            else:
                check_flower(cfg)
            check_work(cfg, build_problem(cfg).layout.size)
        except ValueError as e:  # ConfigError, or an epsilon the accountant cannot reach
            raise ConfigError(f"--grid cell {_cell_text(cell)}: {e}") from None
        out.append((cell, runs))
    return out


class Progress:
    """One stderr line per finished (cell, seed, algorithm), with an estimate of the time left.

    On the batched engine, where the cells of a batch finish together, also
    the batch's rounds (:meth:`batch_round`).
    """

    def __init__(self, total: int, stream: TextIO = sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()
        self.tty = stream.isatty()
        self.batch_start = self.start

    def batch_round(self, batch: int, batches: int, name: str, runs: int, k: int, rounds: int) -> None:
        """Round ``k`` of a batch of ``runs`` runs: one line rewritten in place on a terminal, else every tenth."""
        now = time.perf_counter()
        if k == 1:
            self.batch_start = now
        left = (now - self.batch_start) / k * (rounds - k)
        line = (
            f"sweep batch {batch}/{batches} ({runs} runs of {name}): round {k}/{rounds}"
            f"  ({now - self.start:.1f} s, ~{left:.0f} s left in the batch)"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if k == rounds else ""))
        elif progress_due(k, rounds):
            self.stream.write(line + "\n")
        self.stream.flush()

    def tick(self, cell: Cell, name: str, reached: int | None) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        result = f"rounds_to_target={reached}" if reached is not None else NOT_REACHED
        self.stream.write(
            f"sweep [{self.done}/{self.total}] {_cell_text(cell)} {name}: {result}"
            f"  ({elapsed:.1f} s, ~{left:.0f} s left)\n"
        )
        self.stream.flush()


def _simulate(cfg: dict[str, Any], on_round: OnRound) -> dict[str, dict[str, Any]]:
    from fl_clip21.flower.simulation import simulate

    # One simulation per run: the nodes' client state must start afresh.
    return simulate(cfg, on_round=on_round)


def _mean(values: list[Any]) -> Any:
    """Mean over seeds (one seed: its value); None when some seed has None."""
    if any(v is None for v in values):
        return None
    return values[0] if len(values) == 1 else statistics.fmean(values)


def _summary(recs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    return {
        "rounds_to_target": rounds_to_target(recs, target),
        "final_grad_norm_sq": recs[-1]["grad_norm_sq"],
        "final_loss": recs[-1]["loss"],
    }


def _run_batched(cells: list[tuple[Cell, list[dict[str, Any]]]], progress: Progress) -> dict[tuple[int, int, str], dict]:
    """Every (cell, seed, algorithm) on the vectorized engine, the cells that share a problem in one batch.

    Returns ``{(cell index, run index, algorithm): summary}``.
    """
    from fl_clip21.cells import batch_key, run_cells

    groups: dict[str, tuple[str, list[tuple[int, int, dict[str, Any]]]]] = {}
    for c, (_, runs) in enumerate(cells):
        for r, cfg in enumerate(runs):
            for name in cfg["algorithms"]:
                groups.setdefault(batch_key(cfg, name), (name, []))[1].append((c, r, cfg))
    out = {}
    for j, (name, members) in enumerate(groups.values(), start=1):

        def on_round(c: int, name: str, rec: dict[str, Any], rounds: int, j=j, runs=len(members)) -> None:
            if c == 0:  # every cell of a batch is at the same round
                progress.batch_round(j, len(groups), name, runs, rec["round"], rounds)

        results = run_cells([cfg for _, _, cfg in members], name, on_round)
        for (c, r, cfg), res in zip(members, results):
            out[(c, r, name)] = _summary(res["records"], cfg["target"])
            progress.tick(cells[c][0], name, out[(c, r, name)]["rounds_to_target"])
    return out


def run_sweep(
    cells: list[tuple[Cell, list[dict[str, Any]]]], engine: str = "vectorized", stream: TextIO = sys.stderr
) -> list[dict[str, Any]]:
    """Run every cell of :func:`resolve_cells`; one row per cell and algorithm (grid values, :data:`METRICS`).

    On the vectorized engine the cells that differ only in hyper-parameters run
    as one batch of cells x clients rows (:mod:`fl_clip21.cells`), with each
    cell's own trajectory; on Flower, one simulation per run.
    """
    progress = Progress(sum(len(runs) * len(runs[0]["algorithms"]) for _, runs in cells), stream)
    if engine == "vectorized":
        done = _run_batched(cells, progress)
    else:
        done = {}
        for c, (cell, runs) in enumerate(cells):
            for r, cfg in enumerate(runs):
                seen: dict[str, list[dict[str, Any]]] = {}

                def on_round(name: str, rec: dict[str, Any], rounds: int, cell=cell, cfg=cfg, seen=seen) -> None:
                    seen.setdefault(name, []).append(rec)
                    if rec["round"] == rounds:
                        progress.tick(cell, name, rounds_to_target(seen[name], cfg["target"]))

                for name, res in _simulate(cfg, on_round).items():
                    done[(c, r, name)] = _summary(res["records"], cfg["target"])
    rows = []
    for c, (cell, runs) in enumerate(cells):
        for name in runs[0]["algorithms"]:
            results = [done[(c, r, name)] for r in range(len(runs))]
            row: dict[str, Any] = {**cell, "algorithm": name}
            for metric in METRICS:
                row[metric] = _mean([res[metric] for res in results])
            rows.append(row)
    return rows


# --- outputs ------------------------------------------------------------------


def sweep_csv(rows: list[dict[str, Any]], grid: Grid) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=[*grid, "algorithm", *METRICS])
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return out.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return NOT_REACHED
    if isinstance(value, float):
        return f"{value:.4g}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def sweep_markdown(rows: list[dict[str, Any]], grid: Grid, title: str, target: float, seeds: int) -> str:
    cols = [*grid, "algorithm", *METRICS]
    out = io.StringIO()
    mean = f" Means over {seeds} seeds." if seeds > 1 else ""
    out.write(f"# {title}: sweep\n\nTarget: grad_norm_sq <= {target:g}.{mean}\n\n")
    out.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
    for r in rows:
        out.write("| " + " | ".join(_fmt(r[c]) for c in cols) + " |\n")
    return out.getvalue()


def grad_range(rows: list[dict[str, Any]], target: float) -> tuple[float, float]:
    """The log colour scale of final grad_norm_sq: from the lowest value, the target at most, up to the highest.

    The scale goes no lower than 1/100 of the target: cells further below have
    all reached it, and a scale down to GD's 1e-30 would leave every other cell
    one dark colour. Values that are 0, missing or not finite (a diverged cell)
    do not set the scale.
    """
    values = [r.get("final_grad_norm_sq") for r in rows]
    positive = [v for v in values if v is not None and 0 < v < math.inf]
    low = max(min([*positive, target]), target / 100)
    return low, max([*positive, 10 * low])


def plot_heatmap(
    rows: list[dict[str, Any]], grid: Grid, path: Path, title: str, max_rounds: int, target: float,
    scale: tuple[float, float] | None = None,
):
    """Two heat maps of one algorithm over the grid, side by side; returns the Figure.

    Left: rounds to target (cells never reaching it are grey and labelled).
    Right: the final grad_norm_sq on a log colour scale, so that a cell that
    never reaches the target still shows how far it got; the target is marked
    on its colour bar. ``scale`` is that colour scale (default:
    :func:`grad_range` of ``rows``; :func:`write_sweep` gives every algorithm
    the same one); values below it, 0 included, take its lowest colour.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Patch

    from fl_clip21.report import _pyplot

    plt = _pyplot()
    keys = list(grid)
    y_key, x_key = (keys[0], keys[1]) if len(keys) > 1 else (None, keys[0])
    ys = grid[y_key] if y_key else [""]
    xs = grid[x_key]
    rest = keys[2:]
    panels = [dict(zip(rest, combo)) for combo in itertools.product(*(grid[k] for k in rest))]
    by_cell = {tuple(r[k] for k in keys): r for r in rows}
    rounds_cmap = plt.get_cmap("viridis_r").with_extremes(bad=NOT_REACHED_COLOUR)
    rounds_norm = plt.Normalize(vmin=1, vmax=max(max_rounds, 2))
    low, high = scale or grad_range(rows, target)
    grad_norm = LogNorm(vmin=low, vmax=high)
    grad_cmap = plt.get_cmap("magma_r").with_extremes(bad=NOT_REACHED_COLOUR)
    width = max(4.8, 2.2 + 1.1 * len(xs))
    fig, axes = plt.subplots(
        len(panels), 2, squeeze=False, figsize=(2 * width, 1.4 + (0.8 + 0.55 * len(ys)) * len(panels)),
    )
    for (ax_r, ax_g), panel in zip(axes, panels):
        reached = np.full((len(ys), len(xs)), np.nan)
        final = np.full((len(ys), len(xs)), np.nan)
        for iy, yv in enumerate(ys):
            for ix, xv in enumerate(xs):
                cell = {**({y_key: yv} if y_key else {}), x_key: xv, **panel}
                row = by_cell.get(tuple(cell[k] for k in keys), {})
                r, g = row.get("rounds_to_target"), row.get("final_grad_norm_sq")
                if r is not None:
                    reached[iy, ix] = r
                ax_r.text(
                    ix, iy, f"{r:g}" if r is not None else NOT_REACHED, ha="center", va="center", fontsize=8,
                    color="white" if r is not None and rounds_norm(r) > 0.55 else "black",
                )
                if g is not None:
                    final[iy, ix] = max(g, low)
                    ax_g.text(
                        ix, iy, f"{g:.1e}" if g else "0", ha="center", va="center", fontsize=8,
                        color="white" if grad_norm(max(g, low)) > 0.55 else "black",
                    )
        for ax, m, cmap, norm, label in (
            (ax_r, reached, rounds_cmap, rounds_norm, "rounds to target"),
            (ax_g, final, grad_cmap, grad_norm, "final grad_norm_sq (log)"),
        ):
            image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, norm=norm, aspect="auto")
            ax.set_xticks(range(len(xs)), xs)
            ax.set_yticks(range(len(ys)), ys)
            ax.set_xlabel(x_key)
            if y_key:
                ax.set_ylabel(y_key)
            bar = fig.colorbar(image, ax=ax, label=label)
        bar.ax.axhline(target, color="tab:blue", linewidth=2)
        where = f"{_cell_text(panel)}: " if panel else ""
        ax_r.set_title(f"{where}rounds until grad_norm_sq <= {target:g}", fontsize=9)
        ax_g.set_title(f"{where}final grad_norm_sq (line on the bar: target)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.legend(
        handles=[Patch(facecolor=NOT_REACHED_COLOUR, label=f"{NOT_REACHED} within the rounds run")],
        loc="lower center", fontsize=8, frameon=False,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def sweep_paths(algorithms: list[str]) -> list[str]:
    """The files :func:`write_sweep` writes for a scenario of these algorithms."""
    return ["sweep.csv", "sweep.md", *(f"heatmap-{name}.png" for name in algorithms)]


def write_sweep(
    folder: Path, rows: list[dict[str, Any]], grid: Grid, cfg: dict[str, Any], seeds: int, max_rounds: int
) -> None:
    """Write sweep.csv, sweep.md and one heat map per algorithm into ``folder`` (a staging folder)."""
    folder = Path(folder)
    (folder / "sweep.csv").write_text(sweep_csv(rows, grid))
    (folder / "sweep.md").write_text(sweep_markdown(rows, grid, cfg["name"], cfg["target"], seeds))
    title = plot_title(cfg, leave_out=grid)
    if seeds > 1:
        title += f", means over {seeds} seeds"
    scale = grad_range(rows, cfg["target"])  # one colour scale: the algorithms' maps compare at a glance
    for name in dict.fromkeys(r["algorithm"] for r in rows):
        of_algorithm = [r for r in rows if r["algorithm"] == name]
        plot_heatmap(
            of_algorithm, grid, folder / f"heatmap-{name}.png", f"{name}: {title}", max_rounds, cfg["target"], scale
        )


def cmd_sweep(args: argparse.Namespace) -> int:
    """``fl-clip21 sweep``: check every cell and the output folder, run the grid, write the outputs."""
    if not args.scenario:
        raise ConfigError("sweep needs a SCENARIO file")
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out must name a folder, got ''")
    grid = parse_grid(args.grid or [])
    cells = resolve_cells(Path(args.scenario), grid, parse_sets(args.set or []), args.engine)
    first = cells[0][1][0]
    seeds = len(cells[0][1])
    output = claim(
        Path(args.out) if args.out else None, name=f"{first['name']}-sweep", planned=sweep_paths(first["algorithms"]),
        overwrite=args.overwrite,
    )
    with output:
        rows = run_sweep(cells, args.engine)
        max_rounds = max(r["rounds"] for _, runs in cells for r in runs)
        output.write(lambda folder: write_sweep(folder, rows, grid, first, seeds, max_rounds))
        written = output.commit()
    print(sweep_markdown(rows, grid, first["name"], first["target"], seeds))
    print(output.wrote(written))
    return 0
