"""Flower ServerApp of fl-clip21 (``flwr run .`` loads this).

Run config keys: ``scenario`` (a scenario file, relative to the app folder),
``out`` (output folder, new or empty; ``""``: a new folder ``results/NAME``,
``results/NAME-2``, ... under the working directory), ``overwrite`` (``true``:
write into a non-empty ``out``, replacing only what an earlier fl-clip21 run
wrote there) and ``overrides`` (``"tau=0.5 rounds=80"``, the same keys as
``fl-clip21 run --set``), ``node-keys`` (a key map on this machine,
``partition-id,public-key-file`` per line, :func:`fl_clip21.flower.identity.load_node_keys`:
a node may then hold a partition only if the SuperLink authenticated it with that
partition's key). The output folder is checked and locked before the first round
(:mod:`fl_clip21.outputs`).

The log says what fl-clip21 says on the command line: one progress line per
algorithm every tenth of its rounds, warnings when something goes wrong, and at
the end the summary table and the output folder. Flower's own per-round lines
are left out (:func:`fl_clip21.flower.server.quiet_flower_rounds`).
"""

from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_clip21.config import ConfigError, expand_runs, load_scenario, parse_sets
from fl_clip21.flower.identity import load_node_keys
from fl_clip21.flower.server import quiet_flower_rounds, run_scenario
from fl_clip21.outputs import RESULTS, Wording, claim
from fl_clip21.report import output_paths, progress_due, progress_line, summary_markdown, write_outputs

APP_DIR = Path(__file__).resolve().parent.parent
WORDING = Wording(
    param="run config out", overwrite="run config overwrite=true", new='out="" for a new one under results/'
)

app = ServerApp()


def _log_progress(name: str, rec: dict[str, Any], rounds: int) -> None:
    if progress_due(rec["round"], rounds):
        log(INFO, progress_line(name, rec, rounds))


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = Path(str(context.run_config["scenario"]))
    overrides = parse_sets(str(context.run_config.get("overrides", "")).split())
    cfg = load_scenario(scenario if scenario.is_absolute() else APP_DIR / scenario, overrides)
    runs = expand_runs(cfg)
    out = str(context.run_config.get("out", ""))
    overwrite = context.run_config.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"run config overwrite must be true or false, got {overwrite!r}")
    keys_file = str(context.run_config.get("node-keys", ""))
    node_keys = None
    if keys_file:
        try:
            node_keys = load_node_keys(Path(keys_file))
        except ValueError as e:
            raise ConfigError(f"run config node-keys: {e}") from None
    output = claim(
        Path.cwd() / out if out else None, name=cfg["name"], planned=output_paths(runs), overwrite=overwrite,
        root=Path.cwd() / RESULTS, wording=WORDING,
    )
    with output, quiet_flower_rounds():
        results = [run_scenario(grid, run, on_round=_log_progress, node_keys=node_keys) for run in runs]
        rows = output.write(lambda folder: write_outputs(folder, list(zip(runs, results))))
        written = output.commit()
    for line in summary_markdown(rows, cfg["name"], cfg["target"]).splitlines():
        log(INFO, line)
    log(INFO, output.wrote(written))
