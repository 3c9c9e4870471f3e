"""The diagnosis of docs/dp-results.md: how much of Clip21-SGD2M's g is accumulated noise.

Runs one scenario (one algorithm of the clip21 family, one seed, one epsilon) on the
in-process engine (``fl_clip21.engine.run_local``, which returns the server's g and every
client's memory g_i) and prints, after the last round,

    |g - mean_i g_i|   the noise the server's g has accumulated (docs/algorithms.md,
                       "Clip21-SGD2M": g = mean g_i + (beta2 / n) * sum of the noise sent)
    |mean_i g_i|       the noise-free signal the clients' memories hold
    |grad f(x)|        the full gradient at the final model (all clients, all rows)
    |mean_i g_i - grad f(x)|  how far the memories are from it: stale memories of clients
                       not sampled lately, minibatch noise, the clipping lag

with the final test accuracy and train loss. With ``--no-noise`` the scenario's
``target-epsilon`` is dropped (and sigma is 0): the same run without DP noise, which
separates what the noise costs from what partial participation and clipping cost.

Usage (from the repository root):
    python docs/dp-results/noise_in_g.py SCENARIO ALGORITHM KEY=VALUE...
e.g. python docs/dp-results/noise_in_g.py scenarios/dp/digits-200-iid-local.toml clip21-sgd2m \
         target-epsilon=27 lr=1 tau=0.1 beta1=0.5 beta2=0.3
     python docs/dp-results/noise_in_g.py --no-noise SCENARIO ALGORITHM KEY=VALUE...
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import numpy as np

from fl_clip21.config import expand_runs, parse_sets, resolve
from fl_clip21.engine import run_local
from fl_clip21.problems import build_problem


def main(argv: list[str]) -> int:
    quiet = argv[:1] == ["--no-noise"]
    argv = argv[1:] if quiet else argv
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    scenario, name, sets = Path(argv[0]), argv[1], parse_sets(argv[2:])
    data = tomllib.loads(scenario.read_text())
    if quiet:
        data.pop("target-epsilon", None)
        sets = {k: v for k, v in sets.items() if k != "target-epsilon"}
    (cfg,) = expand_runs(resolve(data, {**sets, "algorithms": name}, base_dir=scenario.parent.resolve()))
    res = run_local(cfg, name)
    server = np.concatenate([np.ravel(v) for v in res["server_state"]["g"].values()])
    memory = res["client_states"]["g" if "g" in res["client_states"] else "v"]
    signal = memory.mean(axis=0)
    problem = build_problem(cfg)
    grad = problem.evaluate(problem.layout.flatten(res["params"])).grad
    last = res["records"][-1]
    print(f"{'(no noise) ' if quiet else ''}{name} {' '.join(argv[2:])} sigma={cfg.get('sigma', 0):.4g}: "
          f"after {last['round']} rounds |g - mean g_i| = {np.linalg.norm(server - signal):.4g}, "
          f"|mean g_i| = {np.linalg.norm(signal):.4g}, |grad f| = {np.linalg.norm(grad):.4g}, "
          f"|mean g_i - grad f| = {np.linalg.norm(signal - grad):.4g}, "
          f"accuracy = {last.get('accuracy', float('nan')):.4g}, loss = {last['loss']:.4g}, "
          f"epsilon = {last.get('epsilon', float('nan')):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
