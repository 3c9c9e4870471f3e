"""`flwr run .`: the app declared in pyproject.toml, through a local SuperLink."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
