"""`flwr run .`: the app declared in pyproject.toml, through a local SuperLink; its output folder."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.common.logger import LOGGER_NAME
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

import server.app as server_app
from fl_clip21.config import ConfigError
from fl_clip21.engine import run_vectorized
from fl_clip21.outputs import MANIFEST, OutputError

ROOT = Path(__file__).resolve().parent.parent


def _pids_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line contains ``text`` (our own temp path)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_flwr_run_runs_the_scenario_given_in_run_config(tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert flwr, "the flwr CLI is installed with flwr"
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # flwr run starts flower-superlink by name: the one beside this Python.
        "PATH": f"{Path(flwr).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = tmp_path / "out"
    pyproject_before = (ROOT / "pyproject.toml").read_text()
    try:
        proc = subprocess.run(
            [
                flwr, "run", str(ROOT), "--stream",
                "--run-config", f"scenario='scenarios/mean-estimation.toml' out='{out}' overrides='rounds=30'",
                "--federation-config", "num-supernodes=3",
            ],
            env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        for pid in _pids_mentioning(str(home)):  # the local SuperLink flwr run started
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert (ROOT / "pyproject.toml").read_text() == pyproject_before
    metrics = json.loads((out / "metrics.json").read_text())["algorithms"]
    assert metrics["clip-gd"][-1]["grad_norm_sq"] == pytest.approx((8 / 3 + 0.5) ** 2, rel=1e-4)  # x -> -0.5
    assert metrics["clip21-gd"][-1]["grad_norm_sq"] < 1e-12
    assert (out / "convergence.png").exists()
    # The log ends with the summary table and the output folder, without Flower's per-round lines.
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in proc.stdout.splitlines()]
    info = [m for line in plain if line.startswith("INFO") and (m := line.partition(":")[2].strip())]
    assert info[-1] == (
        f"wrote {out}/: bytes.png, config.json, convergence.png, final_params.npz, loss.png, metrics.json, "
        "summary.csv, summary.md"
    ), info[-5:]
    assert info[-2].startswith("| clip21-gd | 1 |")
    assert "[ROUND" not in proc.stdout and "Aggregated MetricRecord" not in proc.stdout
    assert sum(m.startswith("[clip21-gd] round") for m in info) == 10  # every tenth of the 30 rounds


def _context(**run_config: str | bool) -> Context:
    config = {"scenario": "scenarios/mean-estimation.toml", "overrides": "rounds=5", **run_config}
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)


class _NoGrid:
    """A Grid the app must not use: it stops before the first round."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the ServerApp used the grid ({name}) before refusing its output folder")


def test_the_default_out_is_a_new_folder_per_run():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config["out"] == "" and config["overwrite"] is False


def test_serverapp_writes_a_new_folder_per_run_and_refuses_a_non_empty_out_before_the_rounds(tmp_path, monkeypatch):
    ran: list[str] = []

    def run_scenario(grid, cfg, on_round=None, node_keys=None):
        ran.append(cfg["name"])
        return run_vectorized(cfg, on_round=on_round)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(server_app, "run_scenario", run_scenario)
    for _ in range(2):
        server_app.main(_NoGrid(), _context(out="", overwrite=False))
    results = tmp_path / "results"
    assert sorted(p.name for p in results.iterdir()) == ["mean-estimation", "mean-estimation-2"]
    assert all((results / name / "metrics.json").is_file() for name in ("mean-estimation", "mean-estimation-2"))

    out = results / "mean-estimation"
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(OutputError) as e:
        server_app.main(_NoGrid(), _context(out=str(out)))
    assert str(e.value).startswith(f"run config out {str(out)!r} is not empty (")
    assert "run config overwrite=true" in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before and len(ran) == 2

    server_app.main(_NoGrid(), _context(out="results/mean-estimation", overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and len(ran) == 3
    assert "notes.txt" not in json.loads((out / MANIFEST).read_text())["files"]
    with pytest.raises(ConfigError, match="run config overwrite must be true or false, got 'yes'"):
        server_app.main(_NoGrid(), _context(out="", overwrite="yes"))
    assert len(ran) == 3


class _Lines(logging.Handler):
    """The messages Flower's logger passes on."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_serverapp_logs_progress_then_the_summary_table_and_the_output_folder(tmp_path, monkeypatch):
    # Prepare
    def run_scenario(grid, cfg, on_round=None, node_keys=None):
        # Flower's Strategy.start narrates its start from Flower's strategy package: left out.
        log_strategy_start_info(cfg["rounds"], ArrayRecord(), None, None)
        return run_vectorized(cfg, on_round=on_round)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(server_app, "run_scenario", run_scenario)
    logger, lines = logging.getLogger(LOGGER_NAME), _Lines()
    logger.addHandler(lines)
    try:
        # Execute
        server_app.main(_NoGrid(), _context(out="out", overrides="rounds=20"))
    finally:
        logger.removeHandler(lines)
    # Assert
    out = tmp_path / "out"
    assert lines.lines[-1] == (
        f"wrote {out}/: bytes.png, config.json, convergence.png, final_params.npz, loss.png, metrics.json, "
        "summary.csv, summary.md"
    )
    start = lines.lines.index("# mean-estimation")
    assert lines.lines[start:-1] == (out / "summary.md").read_text().splitlines()
    progress = [m.split()[2] for m in lines.lines[:start] if m.startswith("[clip21-gd] round")]
    assert progress == [f"{k}/20" for k in range(2, 21, 2)]  # every tenth of the rounds
    assert not any("Number of rounds" in m for m in lines.lines)
    # Outside the app, Flower's lines are as they were.
    logger.addHandler(lines)
    try:
        log_strategy_start_info(3, ArrayRecord(), None, None)
    finally:
        logger.removeHandler(lines)
    assert "\t├── Number of rounds: 3" in lines.lines
