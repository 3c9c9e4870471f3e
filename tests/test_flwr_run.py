"""`flwr run .`: the app declared in pyproject.toml, through a local SuperLink; its output folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

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

    def run_scenario(grid, cfg, node_keys=None):
        ran.append(cfg["name"])
        return run_vectorized(cfg)

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
