"""``fl-clip21 run --resume DIR`` through the real command line.

A run is killed (SIGKILL, its whole process group: the CLI, its Ray instance and
actors) once its checkpoint shows a few completed rounds of its second algorithm;
``--resume`` must finish it with the trajectory and final models of an uninterrupted
run (the in-process reference engine, which ``tests/test_deployment.py`` shows equal
to Flower's simulation engine), and say that it resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fl_clip21 import checkpoint
from fl_clip21.config import load_scenario, parse_sets
from fl_clip21.engine import run_local

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "fl_clip21.cli"]
SCENARIO = REPO / "scenarios" / "logreg-nonconvex.toml"
ROUNDS = 60
SETS = [f"rounds={ROUNDS}", "num-clients=5", "algorithms=gd,clip21-gd"]
KILL_AFTER = 3  # completed rounds of clip21-gd (the second algorithm)
RUN_TIMEOUT = 300.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FLWR_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except OSError:
            pass
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (its own session), then wait until it is gone."""
    members = _group(proc.pid)
    if proc.poll() is None:
        assert os.getpgid(proc.pid) == proc.pid  # started with start_new_session: a group of its own
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for p in members:  # by PID (psutil checks it is still the same process)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(members, timeout=30)
    assert not alive, f"processes of the killed run still running: {alive}"


def _round(path: Path) -> int:
    """Completed rounds in a checkpoint file (0 if there is none yet)."""
    if not path.exists():
        return 0
    return int(checkpoint.load(path)[1]["round"])


def _run(args: list[str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [*CLI, "run", *args], cwd=REPO, env=_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)  # leftovers only; a finished run has none
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.timeout(900)
def test_killed_run_resumed_from_the_command_line_gives_the_uninterrupted_trajectory(tmp_path):
    out = tmp_path / "out"
    ckpt = out / "checkpoint" / "run-0"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [*CLI, "run", str(SCENARIO), *sum((["--set", s] for s in SETS), []), "--out", str(out)],
        cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while _round(ckpt / "clip21-gd.npz") < KILL_AFTER:
            assert first.poll() is None, f"the run ended before it was killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint of clip21-gd in time"
            time.sleep(0.05)
    finally:
        _kill_group(first)
        log.close()
    assert first.returncode == -signal.SIGKILL
    killed_at = _round(ckpt / "clip21-gd.npz")
    assert _round(ckpt / "gd.npz") == ROUNDS
    assert KILL_AFTER <= killed_at < ROUNDS, killed_at
    assert not (out / "metrics.json").exists()  # outputs are written only at the end

    # A new run on the folder neither discards the checkpoint nor waits for the killed run's lock.
    plain = _run([str(SCENARIO), "--engine", "vectorized", "--out", str(out)], timeout=60)
    assert plain.returncode == 2, plain.stderr[-3000:]
    assert f"holds an interrupted run: continue it with --resume {out}, or --overwrite to discard it" in plain.stderr
    assert _round(ckpt / "clip21-gd.npz") == killed_at

    resumed = _run(["--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed: gd after round {ROUNDS} of {ROUNDS}, clip21-gd after round {killed_at} of {ROUNDS}" in resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_round"] == {"gd": ROUNDS, "clip21-gd": killed_at}
    assert not (out / "checkpoint").exists()  # a finished run leaves no checkpoint to resume
    assert not (out / ".fl-clip21.lock").exists() and not (out / ".fl-clip21-staging").exists()

    cfg = load_scenario(SCENARIO, parse_sets(SETS))
    with np.load(out / "final_params.npz") as npz:
        final = {k: npz[k] for k in npz.files}
    for name in cfg["algorithms"]:
        ref = run_local(cfg, name)
        recs = metrics["algorithms"][name]
        assert [r["round"] for r in recs] == list(range(1, ROUNDS + 1)), name
        got = np.array([r["grad_norm_sq"] for r in recs])
        want = np.array([r["grad_norm_sq"] for r in ref["records"]])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-30, err_msg=name)
        for key, arr in ref["params"].items():
            np.testing.assert_allclose(final[f"{name}/{key}"], arr, rtol=1e-12, atol=1e-15, err_msg=name)

    again = _run(["--resume", str(out)], timeout=60)
    assert again.returncode == 2 and "holds no interrupted run" in again.stderr and str(out) in again.stderr


def _resume_error(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", "--resume", str(folder)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)


def test_resume_of_a_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nope"
    proc = _resume_error(missing)
    assert proc.returncode == 2, proc.stderr
    assert "--resume" in proc.stderr and str(missing) in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not missing.exists()


def test_resume_of_a_folder_without_checkpoint_names_it(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")
    proc = _resume_error(tmp_path / "done")
    assert proc.returncode == 2, proc.stderr
    assert str(tmp_path / "done") in proc.stderr and "no checkpoint/config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["metrics.json"]  # untouched


def test_resume_with_an_unreadable_checkpoint_config_names_the_file(tmp_path):
    saved = tmp_path / "run" / "checkpoint" / "config.json"
    saved.parent.mkdir(parents=True)
    saved.write_text("{not json")
    proc = _resume_error(tmp_path / "run")
    assert proc.returncode == 2, proc.stderr
    assert str(saved) in proc.stderr and "Traceback" not in proc.stderr


def test_resume_takes_no_scenario_or_set(tmp_path):
    proc = subprocess.run(
        [*CLI, "run", str(SCENARIO), "--resume", str(tmp_path)], cwd=REPO, env=_env(),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--resume" in proc.stderr and "SCENARIO" in proc.stderr, proc.stderr
