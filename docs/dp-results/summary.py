"""Tables and plots of docs/dp-results.md from the tune.csv files of docs/dp-results/run.sh.

    python docs/dp-results/summary.py [--ylabel=TEXT] OUT.png REFERENCE TUNE_DIR...

Reads every TUNE_DIR/tune.csv (one row per algorithm and epsilon: the cell tune chose,
the mean and std over the evaluation seeds) and prints a markdown table: one row per
epsilon, one column per algorithm (mean +- std), and for every other algorithm A the
margin A - REFERENCE with spread sqrt(std_A^2 + std_REFERENCE^2) (the two std combined
as independent; tune reports no per-seed values, so no paired difference). An algorithm
that appears in several TUNE_DIRs is an error. Writes OUT.png: mean +- std against epsilon.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path


def read(dirs: list[str]) -> dict[str, dict[float, tuple[float, float, str, str]]]:
    table: dict[str, dict[float, tuple[float, float, str, str]]] = {}
    owner: dict[str, str] = {}
    for d in dirs:
        with open(Path(d) / "tune.csv", newline="") as f:
            for row in csv.DictReader(f):
                name = row["algorithm"]
                if owner.setdefault(name, d) != d:
                    raise SystemExit(f"{name} is in both {owner[name]} and {d}")
                table.setdefault(name, {})[float(row["epsilon"])] = (
                    float(row["mean"]), float(row["std"]), row["cell"], row["edge"])
    return table


def main(argv: list[str]) -> int:
    ylabel = "test accuracy (mean +- std, held-out seeds)"
    if argv and argv[0].startswith("--ylabel="):
        ylabel, argv = argv[0].removeprefix("--ylabel="), argv[1:]
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    png, reference, dirs = Path(argv[0]), argv[1], argv[2:]
    table = read(dirs)
    if reference not in table:
        raise SystemExit(f"reference {reference!r} is in none of the tune.csv files: {', '.join(table)}")
    names = list(table)
    others = [n for n in names if n != reference]
    epsilons = sorted({e for t in table.values() for e in t})
    print("| epsilon | " + " | ".join(names) + " | " + " | ".join(f"{n} - {reference}" for n in others) + " |")
    print("|---" * (1 + len(names) + len(others)) + "|")
    for e in epsilons:
        cells = [f"{table[n][e][0]:.3f} +- {table[n][e][1]:.3f}" if e in table[n] else "-" for n in names]
        margins = []
        for n in others:
            if e in table[n] and e in table[reference]:
                (a, sa, *_), (b, sb, *_) = table[n][e], table[reference][e]
                margins.append(f"{a - b:+.3f} +- {math.hypot(sa, sb):.3f}")
            else:
                margins.append("-")
        print(f"| {e:g} | " + " | ".join(cells) + " | " + " | ".join(margins) + " |")
    print("\nchosen cells (edge: the keys whose chosen value is the end of its grid)\n")
    print("| algorithm | epsilon | cell | edge |\n|---|---|---|---|")
    for n in names:
        for e in sorted(table[n]):
            print(f"| {n} | {e:g} | {table[n][e][2]} | {table[n][e][3] or '-'} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in names:
        es = sorted(table[n])
        ax.errorbar(es, [table[n][e][0] for e in es], yerr=[table[n][e][1] for e in es],
                    marker="o", capsize=3, label=n)
    ax.set_xscale("log")
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    ax.set_xlabel(r"$\varepsilon$")
    ax.set_ylabel(ylabel)
    ax.set_title(png.stem)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
