"""The diagnosis of docs/dp-results.md: how much of Clip21-SGD2M's g is accumulated noise.

Runs one scenario (one algorithm of the clip21 family, one seed, one epsilon) on the
in-process engine (``fl_clip21.engine.run_local``, which returns the server's g and every
client's memory g_i) and prints, after the last round,

    |g - mean_i g_i|   the noise the server's g has accumulated (docs/algorithms.md,
                       "Clip21-SGD2M": g = mean g_i + (beta2 / n) * sum of the noise sent)
    |mean_i g_i|       the noise-free signal the clients' memories hold

with the final test accuracy and train loss.

Usage (from the repository root):
    python docs/dp-results/noise_in_g.py SCENARIO ALGORITHM KEY=VALUE...
e.g. python docs/dp-results/noise_in_g.py scenarios/dp/digits-200-iid-local.toml clip21-sgd2m \
         target-epsilon=27 lr=1 tau=0.1 beta1=0.5 beta2=0.3
"""

from __future__ import annotations

import sys

import numpy as np

from fl_clip21.config import expand_runs, load_scenario, parse_sets
from fl_clip21.engine import run_local


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    scenario, name, sets = argv[0], argv[1], parse_sets(argv[2:])
    (cfg,) = expand_runs(load_scenario(scenario, {**sets, "algorithms": name}))
    res = run_local(cfg, name)
    server = np.concatenate([np.ravel(v) for v in res["server_state"]["g"].values()])
    memory = res["client_states"]["g" if "g" in res["client_states"] else "v"]
    signal = memory.mean(axis=0)
    last = res["records"][-1]
    print(f"{name} {' '.join(argv[2:])} sigma={cfg.get('sigma', 0):.4g}: after {last['round']} rounds "
          f"|g - mean g_i| = {np.linalg.norm(server - signal):.4g}, |mean g_i| = {np.linalg.norm(signal):.4g}, "
          f"accuracy = {last.get('accuracy', float('nan')):.4g}, loss = {last['loss']:.4g}, "
          f"epsilon = {last.get('epsilon', float('nan')):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
