"""A stopped run leaves no process behind: SIGINT / SIGTERM end a waiting simulation, Ray included (README, "Outputs")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fl_clip21.flower import stop

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 180.0  # Ray and the actors start (a loaded 2-core machine)
STOP_S = 30.0


def _started(proc: subprocess.Popen) -> list[psutil.Process]:
    """Once the run's ClientApp actors are up (it is waiting then): every process it started."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        children = psutil.Process(proc.pid).children(recursive=True)
        if any("ClientAppActor" in _name(c) for c in children):
            time.sleep(2.0)  # past the first messages: the ServerApp waits
            return psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no ClientAppActor within {STARTUP_S:.0f} s")


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


def _alive(processes: list[psutil.Process]) -> list[str]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {_name(p)[:80]}")
        except psutil.NoSuchProcess:
            continue
    return out


def _stop(proc: subprocess.Popen, signum: int) -> tuple[int, str, list[str], float]:
    """Send ``signum`` to the waiting run; its exit status, stderr, what it left alive, seconds to exit."""
    started = _started(proc)
    assert any("raylet" in _name(p) for p in started), [_name(p) for p in started]
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        for p in started:
            p.kill()
        pytest.fail(f"still running {STOP_S:.0f} s after {signal.Signals(signum).name}")
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + 10.0  # Ray's processes end a moment after the driver's shutdown call
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc.returncode, err, _alive(started), seconds


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_sigint_stops_a_waiting_cli_run_keeps_its_checkpoint_and_leaves_no_process(tmp_path):
    # Prepare: every client is slow (5 s a round), so the server waits for replies most of the time
    out = tmp_path / "out"
    sets = ["algorithms=clip21-gd", "num-clients=2", "rounds=50", "straggler-fraction=1", "straggler-delay=5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_clip21.cli", "run", str(ROOT / "scenarios" / "logreg-nonconvex.toml"),
         *[a for s in sets for a in ("--set", s)], "--out", str(out)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Execute
    status, err, alive, _ = _stop(proc, signal.SIGINT)
    # Assert
    assert status == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"fl-clip21: stopped by SIGINT; the checkpoint is kept: continue with fl-clip21 run --resume {out}"
    )
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert not alive
    assert (out / "checkpoint" / "config.json").is_file()


def test_sigterm_stops_a_simulation_waiting_for_nodes_and_shuts_ray_down():
    # Prepare: Clip21Strategy waits for 5 nodes, the simulation has 3 (the wait is 600 s)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "wait_for_nodes.py")],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Execute
    status, err, alive, seconds = _stop(proc, signal.SIGTERM)
    # Assert: no client work is in flight, so the wait ends at its next poll, and Ray with it
    assert status == 143, err[-3000:]
    assert "RunStopped: stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert not alive
    assert seconds < 15.0


def test_a_stop_request_ends_grid_calls_and_waits():
    class Grid:
        def get_node_ids(self):
            return [1, 2]

    grid = stop.stoppable(Grid())
    stop.reset()
    assert grid.get_node_ids() == [1, 2]
    t0 = time.monotonic()
    threading.Timer(0.2, stop.request, args=(signal.SIGTERM,)).start()
    with pytest.raises(stop.RunStopped, match="stopped by SIGTERM") as e:
        stop.wait(30.0)
    assert time.monotonic() - t0 < 5.0 and e.value.exit_status == 143
    with pytest.raises(stop.RunStopped):
        grid.get_node_ids()
    stop.request(signal.SIGINT)  # the first signal is the one reported
    with pytest.raises(stop.RunStopped, match="SIGTERM"):
        stop.check()
    stop.reset()
    assert grid.get_node_ids() == [1, 2]
