"""Running the simulated clients on an existing Ray cluster, and never on one by accident.

The module starts its own one-node cluster with ``ray start --head --block`` on
loopback, in a temporary folder of its own, runs ``fl-clip21 run --ray-address``
against it and checks in the cluster's session logs that the run's driver and its
ClientApp actors were there. A run without an address must start a new local Ray
instance even when Ray's default temp folder names a live cluster
(``ray_current_cluster``), which plain ``ray.init()`` would attach to.

Every process the cluster started is stopped by its PID (with its start time, so a
reused PID is never signalled) in the fixture's ``finally``, and the folder with
``ray_current_cluster`` is removed, so nothing is left behind for later Ray runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from fl_clip21 import config
from fl_clip21.flower.simulation import LOCAL_RAY, backend_config, resolve_ray_address

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT = 90.0  # s for `ray start` to record its address
RUN_TIMEOUT = 120.0  # s for one small `fl-clip21 run` (about 10 s here)
# Ray turns 127.0.0.1 into the machine's outward address unless told this is a
# single-machine set-up; with it, the cluster and its drivers stay on loopback.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DEFAULT_ADDRESS_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


# --- which Ray a run uses (no cluster needed) ---------------------------------------


def test_no_address_means_a_new_local_instance(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init = backend_config(config.resolve({}))["init_args"]
    assert init["address"] == LOCAL_RAY == "local"
    assert init["num_cpus"] == (os.cpu_count() or 1)


@pytest.fixture
def head() -> Iterator[str]:
    """``127.0.0.1:PORT`` where something listens (all the address check looks for)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_explicit_address_and_ray_address_variable_attach(monkeypatch, head):
    cfg = config.resolve({}, config.parse_sets(["num-cpus=0.5"]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    bc = backend_config(cfg, head)
    assert bc["init_args"] == {"include_dashboard": False, "address": head}  # the cluster's CPUs, not ours
    assert bc["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    monkeypatch.setenv("RAY_ADDRESS", head)
    assert backend_config(cfg)["init_args"]["address"] == head
    assert resolve_ray_address("127.0.0.1:1") == "127.0.0.1:1"  # the flag beats the variable
    assert resolve_ray_address(LOCAL_RAY) is None
    monkeypatch.setenv("RAY_ADDRESS", LOCAL_RAY)
    assert backend_config(cfg)["init_args"]["address"] == LOCAL_RAY


def test_gpus_are_not_checked_locally_when_attaching(monkeypatch, head):
    # The cluster's nodes have the GPUs, not necessarily this machine.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = config.resolve({}, config.parse_sets(["num-gpus=1"]))
    assert backend_config(cfg, head)["client_resources"]["num_gpus"] == 1.0


def test_unreachable_or_malformed_address_is_a_config_error(monkeypatch):
    # Ray would retry an unreachable address forever and the simulation would hang.
    cfg = config.resolve({})
    closed = f"127.0.0.1:{free_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address, words in [(closed, ["--ray-address", closed, "no Ray cluster answers"]),
                           ("head-without-port", ["--ray-address", "head-without-port", "host:port"])]:
        with pytest.raises(config.ConfigError) as ei:
            backend_config(cfg, address)
        assert all(w in str(ei.value) for w in words), str(ei.value)
    monkeypatch.setenv("RAY_ADDRESS", closed)
    with pytest.raises(config.ConfigError) as ei:
        backend_config(cfg)
    assert "RAY_ADDRESS" in str(ei.value) and closed in str(ei.value)


def test_cli_ray_address_needs_the_flower_engine(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "run", "scenarios/mean-estimation.toml",
         "--engine", "vectorized", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--ray-address" in proc.stderr and "vectorized" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_unreachable_address_exits_2_before_anything_starts(tmp_path):
    closed = f"127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "run", "scenarios/mean-estimation.toml",
         "--ray-address", closed, "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "--ray-address" in proc.stderr and closed in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# --- processes --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[psutil.Process], timeout: float = 20.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL, exactly these processes; returns those still alive."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in alive:
            try:
                p.send_signal(sig)  # psutil checks the PID still names the same process
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(alive, timeout=wait)
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@dataclass
class Cluster:
    address: str
    temp_dir: Path  # the cluster's --temp-dir
    session: Path  # its session folder (logs/ has a file per driver and worker)
    head: psutil.Process
    seen: set[psutil.Process] = field(default_factory=set)

    def note(self) -> None:
        """Remember every process the cluster runs now (workers come and go)."""
        if self.head.is_running():
            self.seen |= set(self.head.children(recursive=True))

    def logs(self) -> list[Path]:
        return sorted((self.session / "logs").iterdir())


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FLWR_"))}
    env.update(LOOPBACK, PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    # A short folder: Ray's socket paths under it must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="flc21-ray-", dir="/tmp"))
    temp_dir = root / "ray"
    had_default_file = DEFAULT_ADDRESS_FILE.exists()
    port = free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", str(temp_dir),
        "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
        # Fixed defaults that another cluster on this machine may hold:
        "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
    ]
    log = open(root / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = None
    try:
        head = psutil.Process(proc.pid)
        address_file = temp_dir / "ray_current_cluster"  # written once every daemon is up
        deadline = time.monotonic() + START_TIMEOUT
        while not address_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up (exit {proc.poll()}):\n{(root / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(0.2)
        address = address_file.read_text().strip()
        assert address == f"127.0.0.1:{port}", address
        cluster = Cluster(address, temp_dir, (temp_dir / "session_latest").resolve(), head)
        cluster.note()
        yield cluster
    finally:
        procs = [psutil.Process(proc.pid)] if proc.poll() is None else []
        if cluster is not None:
            cluster.note()
            procs += sorted(cluster.seen, key=lambda p: p.pid)
        procs += [p for p in _mentioning(str(root)) if p not in procs]  # anything else in our folder
        left = _stop(procs)  # `ray start --block` stops its daemons on SIGTERM; the rest by PID
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"cluster processes still running: {left}"
        assert had_default_file or not DEFAULT_ADDRESS_FILE.exists(), "a ray_current_cluster file was left in /tmp/ray"


def _cli_run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """``fl-clip21 run ARGS`` in its own session; returns it and its PID. Nothing of it survives."""
    proc = subprocess.Popen(
        [str(BIN / "fl-clip21"), "run", *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    group = [psutil.Process(proc.pid)]
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        # Whatever it started and left behind (a local Ray instance's daemons) shares
        # its process group: stop exactly those processes.
        group += [p for p in psutil.process_iter() if _pgid(p) == proc.pid]
        left = _stop(group)
        assert not left, f"processes of the run still running: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), proc.pid


def _mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line names ``text`` (our unique temp folder)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(text in arg for arg in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except OSError:
        return None


def _driver_logs(cluster: Cluster, pid: int) -> list[Path]:
    return [p for p in cluster.logs() if p.name.startswith("python-core-driver-") and p.name.endswith(f"_{pid}.log")]


def _actor_logs(cluster: Cluster) -> list[Path]:
    return [
        p for p in cluster.logs()
        if p.name.startswith("worker-") and p.suffix == ".out" and "ClientAppActor" in p.read_text(errors="replace")
    ]


SMALL = ["scenarios/mean-estimation.toml", "--set", "rounds=3", "--set", "algorithms=clip21-gd"]


def test_cli_runs_on_an_existing_cluster(ray_cluster, tmp_path):
    out = tmp_path / "out"
    run, pid = _cli_run([*SMALL, "--out", str(out), "--ray-address", ray_cluster.address], _clean_env(), REPO)
    ray_cluster.note()
    assert run.returncode == 0, run.stderr[-3000:]
    recs = json.loads((out / "metrics.json").read_text())["algorithms"]["clip21-gd"]
    assert [r["accepted"] for r in recs] == [3, 3, 3]
    # The run's driver connected to this cluster, and the ClientApps ran in its workers.
    assert _driver_logs(ray_cluster, pid), [p.name for p in ray_cluster.logs()]
    assert _actor_logs(ray_cluster), [p.name for p in ray_cluster.logs()]


def test_a_run_without_address_never_attaches_to_a_running_cluster(ray_cluster, tmp_path):
    # Ray's default temp folder is the cluster's: its ray_current_cluster names the
    # live cluster, which plain ray.init() would join.
    env = _clean_env(RAY_TMPDIR=str(ray_cluster.temp_dir.parent))
    assert (ray_cluster.temp_dir / "ray_current_cluster").read_text().strip() == ray_cluster.address
    out = tmp_path / "out"
    run, pid = _cli_run([*SMALL, "--out", str(out)], env, REPO)
    ray_cluster.note()
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "metrics.json").exists()
    assert not _driver_logs(ray_cluster, pid), "the run attached to the running cluster"
    own = [s for s in ray_cluster.temp_dir.glob("session_2*") if s.resolve() != ray_cluster.session]
    assert own, "the run did not start a Ray instance of its own"


def test_a_client_no_node_can_host_is_an_error_before_the_run(ray_cluster, tmp_path):
    # Flower's actor pool would be empty: the run would crash or hang.
    out = tmp_path / "out"
    run, _ = _cli_run([*SMALL, "--set", "num-gpus=1", "--out", str(out), "--ray-address", ray_cluster.address], _clean_env(), REPO)
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "num-gpus=1" in run.stderr and ray_cluster.address in run.stderr and "CPU=2 GPU=0" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not out.exists()
