"""Choosing tau for the quickstart CNN, and what it then gives against FedAvg.

1. A probe: the Clip21 version with tau above every update (it is then FedAvg)
   for ``--probe-rounds`` rounds; each round's quantiles of the clients' update
   norms and of the norms clip21_mod clips (``input_norm``) come back in the
   round's train metrics. Suggested tau: fl-clip21's rule
   (``suggest_tau(result.train_metrics_clientapp)``, fl_clip21/calibrate.py),
   the largest q50 of the probe's rounds; and, to show why the rule looks past
   round 1, round 1's q50 alone.
2. FedAvg and Clip21 at each suggested tau and at ``--contrast-tau``, for each
   seed, the same rounds and clients; accuracy of the final model on the
   server's test set (after the last round, and its mean over the last three
   rounds and the seeds: a few rounds of this CNN swing by 0.2), share of
   clipped updates, seconds per round.

Prints Markdown tables. Run from the repository root (a few minutes on 2 cores):

    .venv/bin/python examples/quickstart-clip21/measure.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence

import flwr
import torch

from fl_clip21.calibrate import PROBE_ROUNDS, suggest_tau
from pytorchexample.inprocess import Run, run_config, simulate

ABOVE_EVERY_UPDATE = 1e6


def probe(rounds: int, clients: int, seed: int) -> dict[int, dict]:
    """The train metrics of each round of Clip21 with tau above every update (Result.train_metrics_clientapp)."""
    (run,) = simulate([("clip21", run_config(num_server_rounds=rounds, seed=seed, tau=ABOVE_EVERY_UPDATE))], clients)
    return dict(run.result.train_metrics_clientapp)


def _median_round_seconds(run: Run) -> float:
    # Round 1 of a simulation also starts the Ray actors (imports, torch's first kernels).
    return statistics.median(run.round_seconds[1:] or run.round_seconds)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--probe-rounds", type=int, default=PROBE_ROUNDS)
    parser.add_argument("--contrast-tau", type=float, default=0.1)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()

    records = probe(args.probe_rounds, args.clients, seeds[0])
    print(f"Probe: clip21-gd, tau = {ABOVE_EVERY_UPDATE:g} (no clipping), seed {seeds[0]}, {args.clients} clients\n")
    print("| round | update_norm q10 | q50 | q90 | max | input_norm q50 |\n|---|---|---|---|---|---|")
    for k, r in sorted(records.items()):
        norms = [r[f"fl_clip21.update_norm_{q}"] for q in ("q10", "q50", "q90", "max")]
        print(f"| {k} | " + " | ".join(f"{v:.3g}" for v in norms) + f" | {r['fl_clip21.input_norm_q50']:.3g} |")
    taus = {
        "q50 of round 1": suggest_tau(records[1]),
        f"largest q50 of rounds 1-{args.probe_rounds}": suggest_tau(records),
        "for contrast": args.contrast_tau,
    }
    print("\n" + "\n".join(f"suggested tau ({why}): {tau:.3g}" for why, tau in taus.items() if why != "for contrast"))

    specs = []
    for seed in seeds:
        specs.append(("fedavg", run_config(num_server_rounds=args.rounds, seed=seed)))
        specs += [("clip21", run_config(num_server_rounds=args.rounds, seed=seed, tau=tau)) for tau in taus.values()]
    runs = simulate(specs, args.clients)

    print(
        f"\n{args.rounds} rounds, {args.clients} clients, local epochs {specs[0][1]['local-epochs']}, "
        f"client lr {specs[0][1]['learning-rate']}, accuracy on the server's test set after round {args.rounds}\n"
    )
    last = range(max(1, args.rounds - 2), args.rounds + 1)
    print(
        "| version | tau | " + " | ".join(f"seed {s}" for s in seeds)
        + f" | mean | mean of rounds {last[0]}-{last[-1]} | clipped | s/round |"
    )
    print("|---|---|" + "---|" * len(seeds) + "---|---|---|---|")
    rows = [("FedAvg", "fedavg", None)] + [(f"Clip21 ({why})", "clip21", tau) for why, tau in taus.items()]
    for name, version, tau in rows:
        mine = [r for r in runs if r.version == version and (tau is None or r.config["tau"] == tau)]
        acc = [r.result.evaluate_metrics_serverapp[args.rounds]["accuracy"] for r in mine]
        late = [r.result.evaluate_metrics_serverapp[k]["accuracy"] for r in mine for k in last]
        cells = [name, "-" if tau is None else f"{tau:.3g}", *(f"{a:.3f}" for a in acc), f"{statistics.mean(acc):.3f}"]
        cells.append(f"{statistics.mean(late):.3f}")
        if tau is None:
            cells.append("-")
        else:
            train = [r.result.train_metrics_clientapp[k] for r in mine for k in range(1, args.rounds + 1)]
            cells.append(f"{statistics.mean(m['fl_clip21.clip_fraction'] for m in train):.0%}")
        cells.append(f"{statistics.median(map(_median_round_seconds, mine)):.2f}")
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nclipped: share of the clients' updates clipped, over all rounds and seeds; s/round: median over runs of "
        f"the median round (rounds 2-{args.rounds}: train, client evaluation, central evaluation). "
        f"{platform.machine()}, {torch.get_num_threads()} torch threads in the driver, flwr {flwr.__version__}, "
        f"torch {torch.__version__}; {time.perf_counter() - started:.0f} s in all."
    )


if __name__ == "__main__":
    main()
