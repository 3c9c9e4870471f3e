"""Flower ServerApp of fl-clip21 (``flwr run .`` loads this).

Run config keys: ``scenario`` (a scenario file, relative to the app folder),
``out`` (output folder) and ``overrides`` (``"tau=0.5 rounds=80"``, the same
keys as ``fl-clip21 run --set``).
"""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_clip21.config import expand_runs, load_scenario, parse_sets
from fl_clip21.flower.server import run_scenario
from fl_clip21.report import write_outputs

APP_DIR = Path(__file__).resolve().parent.parent

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = Path(str(context.run_config["scenario"]))
    overrides = parse_sets(str(context.run_config.get("overrides", "")).split())
    cfg = load_scenario(scenario if scenario.is_absolute() else APP_DIR / scenario, overrides)
    runs = expand_runs(cfg)
    results = [run_scenario(grid, run) for run in runs]
    out = Path(str(context.run_config.get("out", "results/flwr-run")))
    write_outputs(out if out.is_absolute() else Path.cwd() / out, list(zip(runs, results)))
