"""What the DP noise costs each method, at fixed cells: the same runs with and without it.

For each ``ALGORITHM:KEY=VALUE,...`` cell, runs scenario SCENARIO on the in-process engine
(``fl_clip21.engine.run_local``) on seeds 1, 2, 3, once without noise (the scenario's
``target-epsilon`` dropped, sigma 0) and once at ``--epsilon``, and prints a Markdown table:
final test accuracy (mean +- std over the seeds) and the share of messages clipped in the
last round, without and with noise, and the accuracy the noise took away.

Usage (from the repository root):
    python docs/dp-results/noise_cost.py SCENARIO --epsilon 8 clip-sgd:lr=3,tau=1 \\
        clip21-sgd2m:lr=3,tau=1,beta1=1,beta2=1
"""

from __future__ import annotations

import argparse
import statistics
import tomllib
from pathlib import Path

from fl_clip21.config import expand_runs, parse_sets, resolve
from fl_clip21.engine import run_local

SEEDS = (1, 2, 3)


def _final(scenario: Path, name: str, sets: list[str], epsilon: float | None, seed: int) -> dict:
    data = tomllib.loads(scenario.read_text())
    data.pop("target-epsilon", None)
    extra = [f"seed={seed}"] + ([f"target-epsilon={epsilon:g}"] if epsilon is not None else [])
    (cfg,) = expand_runs(resolve(data, {**parse_sets(sets + extra), "algorithms": name},
                                 base_dir=scenario.parent.resolve()))
    return run_local(cfg, name)["records"][-1]


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--epsilon", type=float, required=True)
    parser.add_argument("cells", nargs="+", help="ALGORITHM:KEY=VALUE,KEY=VALUE")
    args = parser.parse_args()
    print(f"| cell | accuracy, no noise | accuracy, ε = {args.epsilon:g} | lost to the noise | "
          "clipped, no noise | clipped, with noise |")
    print("|---|---|---|---|---|---|")
    for cell in args.cells:
        name, _, keys = cell.partition(":")
        sets = keys.split(",") if keys else []
        quiet = [_final(args.scenario, name, sets, None, s) for s in SEEDS]
        noisy = [_final(args.scenario, name, sets, args.epsilon, s) for s in SEEDS]
        lost = [a["accuracy"] - b["accuracy"] for a, b in zip(quiet, noisy)]
        print(f"| {name} {' '.join(sets)} | {_mean_std([r['accuracy'] for r in quiet])} | "
              f"{_mean_std([r['accuracy'] for r in noisy])} | {_mean_std(lost)} | "
              f"{statistics.mean(r['clip_fraction'] for r in quiet):.2f} | "
              f"{statistics.mean(r['clip_fraction'] for r in noisy):.2f} |", flush=True)


if __name__ == "__main__":
    main()
