"""Deployment: the same apps on ``flower-superlink`` + three ``flower-supernode`` processes.

Everything runs on loopback: one SuperLink (in Flower 1.41 one HTTP port serves its
Fleet, Control and Runtime APIs), three SuperNodes, each with its own Runtime API
port, FLWR_HOME and ``partition-id`` node config, then ``flwr run ROOT NAME --stream``
through a ``[superlink.NAME]`` entry in ``$FLWR_HOME/config.toml``. The final model of
every algorithm must equal the in-process reference engine, which
``test_reference_engine_equals_flower_simulation`` shows equal to Flower's simulation
engine. Once without TLS (15 rounds, absolute ``out``), once with a CA and a server
certificate made here (5 rounds, relative ``out``: it must land in the SuperLink's
working directory, where the ServerApp process runs).

``test_authenticated_supernodes_over_tls`` runs SuperNodes that authenticate with
registered key pairs (``--enable-supernode-auth``), one with an unregistered key and
one without a key (both refused), and an authenticated node restarted mid-run (same
node id).

Slow: a deployment round takes seconds (a new ClientApp process per node and round,
3 s polling loops; the test prints where the time goes with ``-s``), and 10-30 s on a
busy 2-core machine. Run with ``pytest -m slow -s tests/test_deployment.py``.

Every process the test starts is stopped by its PID in a ``finally`` block, together
with the Flower processes they spawned (SuperExec, ServerApp, ClientApp processes).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import os
import signal
import socket
import re
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fl_clip21.config import expand_runs, load_scenario, parse_sets
from fl_clip21.engine import run_local

# Minutes, not seconds: every round of a deployment starts a new ClientApp process on
# every node and waits on Flower's polling loops (see report_timing below).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flower-superexec ...
SCENARIO = "scenarios/mean-estimation.toml"
OVERRIDES = ("rounds=15", "num-clients=3")
# The TLS run checks the transport: the same scenario, fewer rounds (a round costs
# seconds in deployment, see the module docstring).
TLS_OVERRIDES = ("rounds=5", "num-clients=3")
NUM_NODES = 3
START_TIMEOUT = 120.0  # s for a SuperLink / SuperNode to accept connections
RUN_TIMEOUT = 2400.0  # s for one `flwr run --stream`: 45 rounds took 28 min on an overloaded 2-core box
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --- processes ------------------------------------------------------------------


# A process is identified by (PID, start time) so that a PID the kernel hands out
# again after one of ours exited is never signalled.
Proc = tuple[int, int]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ident(pid: int) -> Proc | None:
    fields = _stat(pid)
    return (pid, int(fields[19])) if fields else None  # field 22 of stat: start time


def _alive(proc: Proc) -> bool:
    fields = _stat(proc[0])
    return fields is not None and int(fields[19]) == proc[1] and fields[0] != "Z"


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[Proc]:
    tree, out, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if ident := _ident(child):
                out.add(ident)
            todo.append(child)
    return out


def _procs_in(folder: Path) -> set[Proc]:
    """Live processes whose working directory is inside ``folder`` (a test temp dir: ours)."""
    folder, found = folder.resolve(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:
                continue
            if (cwd == folder or folder in cwd.parents) and (ident := _ident(int(entry.name))):
                found.add(ident)
    return {p for p in found if _alive(p)}


def _signal(proc: Proc, sig: int) -> None:
    if _alive(proc):
        try:
            os.kill(proc[0], sig)
        except ProcessLookupError:
            pass


T0 = time.monotonic()


def _stamp_lines(pipe, path: Path) -> None:
    """Copy ``pipe`` to ``path``, each line prefixed with the seconds since T0."""
    with pipe, open(path, "w") as f:
        for raw in iter(pipe.readline, b""):
            line = ANSI.sub("", raw.decode(errors="replace").rstrip())
            f.write(f"{time.monotonic() - T0:10.3f} {line}\n")
            f.flush()


class Processes:
    """The processes this test starts; :meth:`stop_all` stops them by PID."""

    def __init__(self, logs: Path, home: Path) -> None:
        self.logs = logs
        self.home = home  # every process gets its working directory in here
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.spawned: set[Proc] = set()  # what our processes started (SuperExec, apps)
        self.readers: list[threading.Thread] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        """Start ``cmd``; its output goes to ``LOGS/NAME.log``, each line stamped with its time."""
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.started.append((name, proc))
        thread = threading.Thread(target=_stamp_lines, args=(proc.stdout, self.logs / f"{name}.log"), daemon=True)
        thread.start()
        self.readers.append(thread)
        return proc

    def note_spawned(self) -> None:
        """Remember the processes ours spawned (before a parent dies and they move to init)."""
        for _, proc in self.started:
            if proc.poll() is None:
                self.spawned |= _descendants(proc.pid)
        # SuperExec, ServerApp and ClientApp processes inherit a working directory in self.home.
        self.spawned |= _procs_in(self.home)

    def left(self) -> set[Proc]:
        """Those of our processes that still run."""
        mine = {(p.pid, 0) for _, p in self.started if p.poll() is None}
        return mine | {p for p in self.spawned if _alive(p)} | _procs_in(self.home)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self, timeout: float = 15.0) -> None:
        """Terminate (then kill) what we started, then whatever it spawned that is still there."""
        self.note_spawned()
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        # SuperExec and app processes watch their parent's PID and exit with it;
        # whatever is left of them (and what they spawned) is stopped here.
        deadline = time.monotonic() + timeout
        sig = signal.SIGTERM
        while True:
            for p in [p for p in self.spawned if _alive(p)]:
                self.spawned |= _descendants(p[0])
            self.spawned |= _procs_in(self.home)
            left = [p for p in self.spawned if _alive(p)]
            if not left or time.monotonic() > deadline + timeout:
                break
            if time.monotonic() > deadline:
                sig = signal.SIGKILL
            for p in left:
                _signal(p, sig)
            time.sleep(0.5)
        for thread in self.readers:  # the pipes close once every writer is gone
            thread.join(timeout=5.0)


# --- ports, certificates ---------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with code {proc.returncode}:\n{procs.log_tail(name)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{what} did not accept connections on 127.0.0.1:{port} within {START_TIMEOUT:.0f} s")


def wait_for_health(port: int, ca: Path | None, proc: subprocess.Popen, procs: Processes, name: str) -> None:
    """Wait until the SuperLink's /health answers (over TLS when ``ca`` is given)."""
    wait_for_port(port, proc, "flower-superlink", procs, name)
    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/health"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError as e:
            if time.monotonic() > deadline:
                pytest.fail(f"SuperLink /health did not answer: {e}\n{procs.log_tail(name)}")
        time.sleep(0.2)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost; returns (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-clip21 test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    folder.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def base_env(home: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("FLWR_", "RAY_"))  # nothing of the caller's Flower / Ray set-up
    }
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # no `uv sync` of the app
        FLWR_DISABLE_UPDATE_CHECK="1",  # no network
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
        # SuperLink and SuperNodes start flower-superexec, flwr-serverapp and
        # flwr-clientapp by name: the ones beside this Python.
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


# --- the expected result -----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def reference(overrides: tuple[str, ...]) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(cfg, {algorithm: final params}) of the scenario run by the in-process engine."""
    runs = expand_runs(load_scenario(ROOT / SCENARIO, parse_sets(list(overrides))))
    assert len(runs) == 1
    cfg = runs[0]
    return cfg, {name: run_local(cfg, name)["params"] for name in cfg["algorithms"]}


def test_reference_engine_equals_flower_simulation():
    """The in-process reference the deployment is compared with equals Flower's simulation engine."""
    from fl_clip21.flower.simulation import simulate

    cfg, expected = reference(OVERRIDES)
    results = simulate(cfg)
    assert set(results) == set(expected)
    for name, params in expected.items():
        for key, arr in params.items():
            np.testing.assert_allclose(results[name]["params"][key], arr, rtol=1e-12, atol=0, err_msg=name)


# --- where a round's time goes -------------------------------------------------------

_EVENTS = {
    "receiving": re.compile(r"Receiving: train message"),
    "received": re.compile(r"Received successfully"),
    "started": re.compile(r"Start `flwr-clientapp` process"),
    "sending": re.compile(r"Sending: train message"),
    "sent": re.compile(r"Sent successfully"),
}


def node_phases(log: Path) -> dict[str, list[float]]:
    """Seconds of each phase of every train message, from a SuperNode's stamped log.

    The SuperNode handles one message at a time, so its log is a sequence of
    receiving -> received -> started (the ClientApp process logs it) -> sending -> sent.
    """
    events: list[tuple[str, float]] = []
    in_train = False
    for line in log.read_text().splitlines():
        stamp, _, text = line.strip().partition(" ")
        if "Receiving:" in text:
            in_train = bool(_EVENTS["receiving"].search(text))
        if not in_train:
            continue
        for name, pattern in _EVENTS.items():
            if pattern.search(text):
                events.append((name, float(stamp)))
    phases: dict[str, list[float]] = {k: [] for k in ("pull", "spawn", "clientapp", "push", "idle")}
    t = {}
    for name, stamp in events:
        t[name] = stamp
        if name == "receiving" and "sent" in t:
            phases["idle"].append(stamp - t["sent"])
        elif name == "sent" and {"receiving", "received", "started", "sending"} <= set(t):
            phases["pull"].append(t["received"] - t["receiving"])
            phases["spawn"].append(t["started"] - t["received"])
            phases["clientapp"].append(t["sending"] - t["started"])
            phases["push"].append(stamp - t["sending"])
    return phases


def report_timing(label: str, elapsed: float, metrics: dict, logs: Path) -> float:
    seconds = [r["seconds"] for recs in metrics.values() for r in recs]
    mean = statistics.fmean(seconds)
    lines = [
        f"[deployment {label}] flwr run {elapsed:.1f} s for {len(seconds)} rounds; "
        f"seconds per round: mean {mean:.2f}, median {statistics.median(seconds):.2f}, "
        f"min {min(seconds):.2f}, max {max(seconds):.2f}"
    ]
    phases: dict[str, list[float]] = {}
    for i in range(NUM_NODES):
        for k, v in node_phases(logs / f"supernode-{i}.log").items():
            phases.setdefault(k, []).extend(v)
    what = {
        "pull": "SuperNode pulls the message objects",
        "spawn": "SuperExec poll (1 s) + new flwr-clientapp process + flwr imports",
        "clientapp": "ClientApp: get task, FAB, import app, train, reply + SuperNode 0.5 s poll",
        "push": "SuperNode pushes the reply",
        "idle": "node idle: ServerApp 3 s reply poll, server update, SuperNode 3 s pull poll",
    }
    for k, v in phases.items():
        if v:
            lines.append(f"    {k:9s} mean {statistics.fmean(v):6.2f} s  max {max(v):6.2f} s  ({what[k]})")
    print("\n" + "\n".join(lines))
    return mean


# --- the deployment ------------------------------------------------------------------


def start_supernode(
    procs: Processes, tmp_path: Path, i: int, link_port: int, ca: Path | None, name: str | None = None,
    extra_config: str = "", private_key: Path | None = None,
) -> tuple[int, subprocess.Popen]:
    """Start a SuperNode holding partition ``i``; returns (its Runtime API port, its process).

    ``extra_config``: more node config. ``private_key``: authenticate with this key
    (see :func:`make_supernode_keys`; needs TLS, ``ca``).
    """
    name = name or f"supernode-{i}"
    node_dir = tmp_path / name
    (node_dir / "home").mkdir(parents=True)
    port = free_port()
    cmd = [
        str(BIN / "flower-supernode"), *([] if ca else ["--insecure"]),
        "--superlink", f"127.0.0.1:{link_port}",
        "--host", "127.0.0.1", "--port", str(port),  # this node's Runtime API (its ClientApps)
        "--node-config", f"partition-id={i} num-partitions={NUM_NODES} {extra_config}".strip(),
    ]
    if ca:
        cmd += ["--root-certificates", str(ca)]
    if private_key:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    return port, procs.start(name, cmd, base_env(node_dir / "home"), cwd=node_dir)


def start_supernodes(
    procs: Processes, tmp_path: Path, link_port: int, ca: Path | None, extra_config=lambda i: ""
) -> list[tuple[int, subprocess.Popen]]:
    """Start NUM_NODES SuperNodes (node i holds partition i) and wait until each listens."""
    nodes = [start_supernode(procs, tmp_path, i, link_port, ca, extra_config=extra_config(i)) for i in range(NUM_NODES)]
    for i, (port, node) in enumerate(nodes):
        wait_for_port(port, node, f"flower-supernode {i}", procs, f"supernode-{i}")
    return nodes


def start_superlink(
    procs: Processes, tmp_path: Path, tls_files: tuple[Path, Path, Path] | None, supernode_auth: bool = False
) -> tuple[Path, int]:
    """Start a SuperLink in ``tmp_path/superlink`` (its working directory); returns (that folder, its port).

    ``supernode_auth``: ``--enable-supernode-auth`` (needs ``tls_files``): only SuperNodes
    whose public key was registered (:func:`register_supernode`) may join.
    """
    assert tls_files or not supernode_auth, "flower-superlink refuses --enable-supernode-auth with --insecure"
    link_dir = tmp_path / "superlink"
    (link_dir / "home").mkdir(parents=True)
    link_port = free_port()
    cmd = [
        str(BIN / "flower-superlink"), *([] if tls_files else ["--insecure"]),
        "--database", str(link_dir / "state.db"),
        # One HTTP port serves the Fleet, Control and Runtime (ServerApp) APIs in 1.41.
        "--host", "127.0.0.1", "--port", str(link_port),
    ]
    if tls_files:
        ca, cert, key = tls_files
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    superlink = procs.start("superlink", cmd, base_env(link_dir / "home"), cwd=link_dir)
    wait_for_health(link_port, tls_files[0] if tls_files else None, superlink, procs, "superlink")
    return link_dir, link_port


def cli_home_for(tmp_path: Path, link_port: int, ca: Path | None) -> Path:
    """A FLWR_HOME for the `flwr` CLI with a ``[superlink.deploy-test]`` entry (the default)."""
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir()
    entry = ["[superlink.deploy-test]", f'address = "127.0.0.1:{link_port}"']
    entry.append(f'root-certificates = "{ca}"' if ca else "insecure = true")
    (cli_home / "config.toml").write_text('[superlink]\ndefault = "deploy-test"\n\n' + "\n".join(entry) + "\n")
    return cli_home


@pytest.mark.timeout(RUN_TIMEOUT + 600)
@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls"])
def test_deployment_equals_in_process_engine(tmp_path, tls):
    overrides = TLS_OVERRIDES if tls else OVERRIDES
    cfg, expected = reference(overrides)
    flwr = BIN / "flwr"
    assert flwr.exists() and (BIN / "flower-superlink").exists() and (BIN / "flower-supernode").exists()

    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs, home=tmp_path)
    tls_files = make_certificates(tmp_path / "certs") if tls else None
    ca = tls_files[0] if tls_files else None

    # The insecure run writes to an absolute `out`; the TLS run to a relative one, to
    # show where a relative `out` lands: in the SuperLink's working directory (the
    # ServerApp process, SuperLink -> flower-superexec -> flwr-serverapp, inherits it).
    out_arg = "out" if tls else str(tmp_path / "out")
    out_dir = tmp_path / "superlink" / "out" if tls else tmp_path / "out"

    try:
        link_dir, link_port = start_superlink(procs, tmp_path, tls_files)
        cli_home = cli_home_for(tmp_path, link_port, ca)
        start_supernodes(procs, tmp_path, link_port, ca)

        start = time.monotonic()
        run_config = f"scenario='{SCENARIO}' out='{out_arg}' overrides='{' '.join(overrides)}'"
        try:
            run = subprocess.run(
                [str(flwr), "run", str(ROOT), "deploy-test", "--stream", "--run-config", run_config],
                env=base_env(cli_home), cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT,
            )
        finally:
            procs.note_spawned()
        elapsed = time.monotonic() - start
        assert run.returncode == 0, (run.stdout[-4000:], run.stderr[-4000:], procs.log_tail("superlink"))
    finally:
        procs.stop_all()

    # Nothing of ours is left, not even the SuperExec / app processes they spawned.
    assert not procs.left(), f"processes still running: {sorted(procs.left())}"

    assert (out_dir / "final_params.npz").exists(), (sorted(p.name for p in link_dir.iterdir()), run.stdout[-3000:])
    with np.load(out_dir / "final_params.npz") as npz:
        got = {k: npz[k] for k in npz.files}
    assert set(got) == {f"{name}/{key}" for name, params in expected.items() for key in params}
    for name, params in expected.items():
        for key, arr in params.items():
            np.testing.assert_allclose(got[f"{name}/{key}"], arr, rtol=1e-12, atol=0, err_msg=name)

    metrics = json.loads((out_dir / "metrics.json").read_text())["algorithms"]
    assert set(metrics) == set(cfg["algorithms"])
    assert all(len(recs) == cfg["rounds"] for recs in metrics.values())
    assert all(r["participants"] == r["accepted"] == NUM_NODES for recs in metrics.values() for r in recs)
    if not tls:  # 15 rounds: Clip21-GD is past Clip-GD's fixed point
        assert metrics["clip21-gd"][-1]["grad_norm_sq"] < metrics["clip-gd"][-1]["grad_norm_sq"]
    report_timing("tls" if tls else "insecure", elapsed, metrics, logs)


# --- a SuperNode killed and restarted mid-run ---------------------------------------

KILL_OVERRIDES = ("rounds=30", "num-clients=3", "algorithms=clip21-gd", "audit=true")
KILL_AFTER = 3  # train messages the victim answers; it is killed while it works on the next one


def _trains_done(log: Path) -> int:
    return len(node_phases(log)["push"]) if log.exists() else 0


def _trains_received(log: Path) -> int:
    """Train messages a SuperNode has pulled, from its stamped log (see :func:`node_phases`)."""
    count, in_train = 0, False
    for line in log.read_text().splitlines() if log.exists() else []:
        if "Receiving:" in line:
            in_train = bool(_EVENTS["receiving"].search(line))
        elif in_train and _EVENTS["received"].search(line):
            count += 1
    return count


@pytest.mark.timeout(RUN_TIMEOUT + 600)
def test_supernode_killed_and_restarted_mid_run_keeps_the_invariant(tmp_path):
    """SIGKILL a SuperNode (and its ClientApp processes) mid-round, start a new one for the same partition.

    The server loses that round's reply once the SuperLink sees the node is gone
    (its heartbeat expires). The new node has empty state and a new node id, and
    without SuperNode authentication it cannot prove it is client 1: the server
    resets client 1 (takes its copy out of g, resyncs the node to zero memory)
    instead of sending it client 1's memory. The audit (clients report the memory
    each round starts from and ends with) shows g == mean(v_i) and every client
    starting from the server's copy in every round, and the run still reaches
    the fault-free run's tolerance.
    """
    cfg, _ = reference(KILL_OVERRIDES)
    fault_free = run_local(cfg, "clip21-gd")["records"]
    assert fault_free[-1]["grad_norm_sq"] <= cfg["target"]

    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs, home=tmp_path)
    out_dir = tmp_path / "out"
    killed_at = None
    try:
        _, link_port = start_superlink(procs, tmp_path, None)
        cli_home = cli_home_for(tmp_path, link_port, None)
        nodes = start_supernodes(procs, tmp_path, link_port, None)
        run_config = f"scenario='{SCENARIO}' out='{out_dir}' overrides='{' '.join(KILL_OVERRIDES)}'"
        run = procs.start(
            "flwr-run",
            [str(BIN / "flwr"), "run", str(ROOT), "deploy-test", "--stream", "--run-config", run_config],
            base_env(cli_home), cwd=tmp_path,
        )
        victim = nodes[1][1]
        deadline = time.monotonic() + RUN_TIMEOUT
        # Kill it mid-round: it has pulled its next train message and not replied (a new
        # ClientApp process takes a second or more to start).
        while _trains_received(logs / "supernode-1.log") <= KILL_AFTER:
            assert run.poll() is None and time.monotonic() < deadline, procs.log_tail("flwr-run")
            time.sleep(0.05)
        assert _trains_done(logs / "supernode-1.log") == KILL_AFTER
        procs.note_spawned()
        tree = _descendants(victim.pid)
        victim.kill()
        for p in tree:
            _signal(p, signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = time.monotonic()
        port, node = start_supernode(procs, tmp_path, 1, link_port, None, name="supernode-1-restarted")
        wait_for_port(port, node, "restarted flower-supernode 1", procs, "supernode-1-restarted")
        try:
            run.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            procs.note_spawned()
        assert run.returncode == 0, procs.log_tail("flwr-run")
    finally:
        procs.stop_all()
    assert not procs.left(), f"processes still running: {sorted(procs.left())}"
    assert killed_at is not None

    recs = json.loads((out_dir / "metrics.json").read_text())["algorithms"]["clip21-gd"]
    assert [r["round"] for r in recs] == list(range(1, cfg["rounds"] + 1))
    lost = [r["round"] for r in recs if r["failed"]]
    assert len(lost) == 1, "the round in flight, and only it, lost the killed node's reply"
    assert recs[lost[0] - 1]["failed"] == 1 and recs[lost[0] - 1]["accepted"] == NUM_NODES - 1
    # The restarted node took part again: full rounds after the loss.
    assert any(r["accepted"] == NUM_NODES for r in recs if r["round"] > lost[-1])
    assert _trains_done(logs / "supernode-1-restarted.log") >= 1
    assert max(r["invariant_gap"] for r in recs) < 1e-12
    assert max(r["memory_gap"] for r in recs) < 1e-12  # the new node started from the server's (zero) copy
    assert recs[-1]["grad_norm_sq"] <= cfg["target"]
    print(
        f"\n[deployment kill] rounds that lost a reply: {lost}; largest |g - mean v_i| "
        f"{max(r['invariant_gap'] for r in recs):.3g}; final grad_norm_sq {recs[-1]['grad_norm_sq']:.3g} "
        f"(fault-free {fault_free[-1]['grad_norm_sq']:.3g}, target {cfg['target']:g})"
    )


# --- data files on the nodes -----------------------------------------------------------


@pytest.mark.timeout(RUN_TIMEOUT + 600)
def test_supernodes_read_data_files_from_their_data_dir(tmp_path):
    """Each SuperNode has the scenario's data file in its own ``data-dir`` node config.

    The file at the scenario's path (machine A's, read by the ServerApp) holds other
    centres than the nodes' copies, so the model shows which file the clients read:
    GD with lr = 1 lands on the mean of the clients' centres.
    """
    server_data = tmp_path / "server-data"
    server_data.mkdir()
    np.save(server_data / "centers.npy", np.zeros((NUM_NODES, 1)))
    node_centers = np.array([[1.0], [2.0], [6.0]])
    scenario = tmp_path / "data-dir.toml"
    scenario.write_text(
        f'name = "data-dir"\nalgorithms = ["gd"]\nrounds = 2\nlr = 1.0\nnum-clients = {NUM_NODES}\n'
        f'[problem]\nname = "mean-estimation"\ncenters = "{server_data / "centers.npy"}"\n'
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs, home=tmp_path)
    out = tmp_path / "out"
    try:
        _, link_port = start_superlink(procs, tmp_path, None)
        cli_home = cli_home_for(tmp_path, link_port, None)
        for i in range(NUM_NODES):
            (tmp_path / f"data-{i}").mkdir()
            np.save(tmp_path / f"data-{i}" / "centers.npy", node_centers)
        start_supernodes(procs, tmp_path, link_port, None, extra_config=lambda i: f'data-dir="{tmp_path / f"data-{i}"}"')
        try:
            run = subprocess.run(
                [str(BIN / "flwr"), "run", str(ROOT), "deploy-test", "--stream",
                 "--run-config", f"scenario='{scenario}' out='{out}'"],
                env=base_env(cli_home), cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT,
            )
        finally:
            procs.note_spawned()
        assert run.returncode == 0, (run.stdout[-4000:], run.stderr[-4000:], procs.log_tail("superlink"))
    finally:
        procs.stop_all()
    assert not procs.left(), f"processes still running: {sorted(procs.left())}"

    recs = json.loads((out / "metrics.json").read_text())["algorithms"]["gd"]
    assert [(r["accepted"], r["failed"]) for r in recs] == [(NUM_NODES, 0)] * 2, recs
    with np.load(out / "final_params.npz") as npz:
        np.testing.assert_allclose(npz["gd/x"], [3.0], rtol=1e-12)  # mean of 1, 2, 6: the nodes' files


# --- authenticated SuperNodes ---------------------------------------------------------


def make_supernode_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode key pair ``folder/NAME``, ``folder/NAME.pub``; returns (private, public).

    ECDSA on P-384 in OpenSSH format, what ``ssh-keygen -t ecdsa -b 384 -N "" -f NAME``
    writes: ``flower-supernode --auth-supernode-private-key`` reads only an OpenSSH EC
    private key, ``flwr supernode register`` only an OpenSSH EC public key on a NIST curve.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode()
    )
    return private, public


def register_supernode(cli_home: Path, public_key: Path) -> int:
    """``flwr supernode register PUBLIC_KEY deploy-test``: the node id the SuperLink gives that key."""
    reg = subprocess.run(
        [str(BIN / "flwr"), "supernode", "register", str(public_key), "deploy-test", "--format", "json"],
        env=base_env(cli_home), capture_output=True, text=True, timeout=START_TIMEOUT,
    )
    assert reg.returncode == 0, (reg.stdout, reg.stderr)
    # A refused key (already registered, ...) exits 0 too, with {"success": false, "error-message": ...}.
    answer = json.loads(reg.stdout)
    assert answer["success"], answer
    return int(answer["node-id"])


def supernode_id(log: Path) -> int | None:
    """The node id a SuperNode logged once the SuperLink accepted it (``SuperNode ID: N``), or None."""
    found = re.search(r"SuperNode ID: (\d+)", log.read_text()) if log.exists() else None
    return int(found.group(1)) if found else None


# flwr 1.41 (flwr/common/constant.py HEARTBEAT_*): the SuperLink counts a node online until
# 2 x 30 s after its last heartbeat, sent every (30 - 5) x 0.7..0.9 s, so a killed node counts
# as online for another 37.5 to 60 s.
STILL_ONLINE_AFTER_KILL = (37.5, 60.0)


def start_supernode_once_accepted(
    procs: Processes, tmp_path: Path, i: int, link_port: int, ca: Path, private_key: Path, name: str,
    killed_at: float, retry: float = 3.0,
) -> tuple[subprocess.Popen, int]:
    """Start an authenticated SuperNode again after its process was killed at ``killed_at``.

    The SuperLink refuses a key whose node it still counts as online (``[code: 2004]
    Failed to activate SuperNode.``; the SuperNode exits). One attempt at once (refused
    unless the old node is already offline), then again from ``STILL_ONLINE_AFTER_KILL[0]``
    seconds after the kill, every ``retry`` seconds. Attempt ``k`` logs to ``NAME-k.log``.
    Returns (the accepted SuperNode's process, attempts refused).
    """
    deadline = killed_at + STILL_ONLINE_AFTER_KILL[1] + 2 * START_TIMEOUT
    refused = 0
    while True:
        _, node = start_supernode(procs, tmp_path, i, link_port, ca, name=f"{name}-{refused}", private_key=private_key)
        log = procs.logs / f"{name}-{refused}.log"
        while node.poll() is None and supernode_id(log) is None:
            assert time.monotonic() < deadline, f"{name} not accepted {deadline - killed_at:.0f} s after the kill"
            time.sleep(0.2)
        if node.poll() is None:
            return node, refused
        while "[code: 2004] Failed to activate SuperNode." not in log.read_text():
            if time.monotonic() > deadline:  # gone for another reason
                pytest.fail(f"{name} exited with code {node.returncode}:\n{procs.log_tail(log.stem)}")
            time.sleep(0.2)
        refused += 1
        time.sleep(max(retry, killed_at + STILL_ONLINE_AFTER_KILL[0] - time.monotonic()))


AUTH_OVERRIDES = ("rounds=5", "num-clients=3", "algorithms=clip21-gd")
# round-timeout: a node killed mid-round and back with its id before the SuperLink saw it gone never answers.
RESTART_OVERRIDES = ("rounds=7", "num-clients=3", "algorithms=clip21-gd", "audit=true", "round-timeout=60")
RESTART_AFTER = 2  # train messages of the second run node 1 answers before it is killed


@pytest.mark.timeout(2 * RUN_TIMEOUT + 600)
def test_authenticated_supernodes_over_tls(tmp_path):
    """SuperNode authentication: only registered keys join, and a restarted node keeps its node id.

    A SuperLink with TLS and ``--enable-supernode-auth``; three key pairs registered
    with ``flwr supernode register``; three SuperNodes started with their private keys.
    Two more claim clients 0 and 1: one with a key nobody registered, one with no key.
    The SuperLink refuses both (they exit). A sixth node has a registered key that the
    run's key map (run config ``node-keys``) does not list, and claims client 0: the
    strategy refuses it, logs it and never sends it a train message. The first run ends
    with the reference engine's model, every round answered by the three mapped nodes
    only. In a second run node 1 is killed (SIGKILL) mid-round and started again with
    its key: the SuperLink refuses it while the dead node still counts as online, then
    gives it the same node id; the strategy sees client 1's own node back, resyncs it
    with its memory (not a reset), and the run completes with g == mean(v_i) and every
    client starting from the server's copy in every round.
    """
    cfg, expected = reference(AUTH_OVERRIDES)
    restart_cfg, _ = reference(RESTART_OVERRIDES)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs, home=tmp_path)
    tls_files = make_certificates(tmp_path / "certs")
    ca = tls_files[0]
    keys = [make_supernode_keys(tmp_path / "keys", f"supernode-{i}") for i in range(NUM_NODES)]
    intruder_key, _ = make_supernode_keys(tmp_path / "keys", "intruder")  # never registered
    spoofer_key, spoofer_public = make_supernode_keys(tmp_path / "keys", "spoofer")  # registered, not in the map
    key_map = tmp_path / "keys" / "node-keys.csv"
    key_map.write_text("".join(f"{i},supernode-{i}.pub\n" for i in range(NUM_NODES)))
    out, restart_out = tmp_path / "out", tmp_path / "out-restart"
    try:
        _, link_port = start_superlink(procs, tmp_path, tls_files, supernode_auth=True)
        cli_home = cli_home_for(tmp_path, link_port, ca)
        node_ids = [register_supernode(cli_home, public) for _, public in keys]
        spoofer_id = register_supernode(cli_home, spoofer_public)
        nodes = [
            start_supernode(procs, tmp_path, i, link_port, ca, private_key=keys[i][0]) for i in range(NUM_NODES)
        ]
        _, intruder = start_supernode(procs, tmp_path, 0, link_port, ca, name="intruder", private_key=intruder_key)
        _, keyless = start_supernode(procs, tmp_path, 1, link_port, ca, name="keyless")
        spoofer_port, spoofer = start_supernode(procs, tmp_path, 0, link_port, ca, name="spoofer", private_key=spoofer_key)
        wait_for_port(spoofer_port, spoofer, "spoofing flower-supernode", procs, "spoofer")
        for i, (port, node) in enumerate(nodes):
            wait_for_port(port, node, f"flower-supernode {i}", procs, f"supernode-{i}")

        start = time.monotonic()
        run_config = (
            f"scenario='{SCENARIO}' out='{out}' overrides='{' '.join(AUTH_OVERRIDES)}' node-keys='{key_map}'"
        )
        try:
            run = subprocess.run(
                [str(BIN / "flwr"), "run", str(ROOT), "deploy-test", "--stream", "--run-config", run_config],
                env=base_env(cli_home), cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT,
            )
        finally:
            procs.note_spawned()
        elapsed = time.monotonic() - start
        assert run.returncode == 0, (run.stdout[-4000:], run.stderr[-4000:], procs.log_tail("superlink"))
        assert intruder.wait(timeout=START_TIMEOUT) == 1 and keyless.wait(timeout=START_TIMEOUT) == 1
        first_output = run.stdout + run.stderr
        report_timing("auth", elapsed, json.loads((out / "metrics.json").read_text())["algorithms"], logs)

        # Second run: kill node 1 while it works on a train message, start it again with its key.
        victim_log = logs / "supernode-1.log"
        trains_before = _trains_received(victim_log)
        run_config = (
            f"scenario='{SCENARIO}' out='{restart_out}' overrides='{' '.join(RESTART_OVERRIDES)}' "
            f"node-keys='{key_map}'"
        )
        run = procs.start(
            "flwr-run-restart",
            [str(BIN / "flwr"), "run", str(ROOT), "deploy-test", "--stream", "--run-config", run_config],
            base_env(cli_home), cwd=tmp_path,
        )
        deadline = time.monotonic() + RUN_TIMEOUT
        while _trains_received(victim_log) <= trains_before + RESTART_AFTER:
            assert run.poll() is None and time.monotonic() < deadline, procs.log_tail("flwr-run-restart")
            time.sleep(0.05)
        procs.note_spawned()
        victim = nodes[1][1]
        tree = _descendants(victim.pid)
        victim.kill()
        for p in tree:
            _signal(p, signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = time.monotonic()
        _, refused = start_supernode_once_accepted(
            procs, tmp_path, 1, link_port, ca, keys[1][0], name="supernode-1-restarted", killed_at=killed_at
        )
        back_after = time.monotonic() - killed_at
        try:
            run.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            procs.note_spawned()
        assert run.returncode == 0, procs.log_tail("flwr-run-restart")
    finally:
        procs.stop_all()
    assert not procs.left(), f"processes still running: {sorted(procs.left())}"

    # Each registered node got the node id registered for its key.
    assert [supernode_id(logs / f"supernode-{i}.log") for i in range(NUM_NODES)] == node_ids
    # The intruders: refused by the SuperLink, never a node id, never a message.
    link_log = (logs / "superlink.log").read_text()
    assert "[code: 2004] Failed to activate SuperNode." in (logs / "intruder.log").read_text()
    assert "[code: 2001] SuperNode authentication is enabled." in (logs / "keyless.log").read_text()
    assert supernode_id(logs / "intruder.log") is None and supernode_id(logs / "keyless.log") is None
    assert re.search(r"\[/v1/fleet/activate-node\]\[ApiError:2004\].*No SuperNode found with the given public", link_log)
    assert "[/v1/fleet/register-node][ApiError:2001]" in link_log
    assert {int(n) for n in re.findall(r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)", link_log)} == {
        *node_ids, spoofer_id
    }
    # The spoofer: refused by the strategy (its key is not client 0's), asked nothing after the handshake.
    refusal = f"refused node {spoofer_id}: node {spoofer_id} claims partition 0 but its public key is not in the key map"
    assert refusal in first_output, first_output[-3000:]
    assert "Receiving: train message" not in (logs / "spoofer.log").read_text()

    # First run: the reference model, every round answered by the three registered nodes.
    with np.load(out / "final_params.npz") as npz:
        got = {k: npz[k] for k in npz.files}
    assert set(got) == {f"{name}/{key}" for name, params in expected.items() for key in params}
    for name, params in expected.items():
        for key, arr in params.items():
            np.testing.assert_allclose(got[f"{name}/{key}"], arr, rtol=1e-12, atol=0, err_msg=name)
    recs = json.loads((out / "metrics.json").read_text())["algorithms"]["clip21-gd"]
    assert [(r["round"], r["participants"], r["accepted"]) for r in recs] == [
        (k, NUM_NODES, NUM_NODES) for k in range(1, cfg["rounds"] + 1)
    ]

    # Second run: the restarted node came back with node 1's id and took part again.
    assert refused >= 1, "the SuperLink let a second process in with the key of a node it still counted as online"
    assert f"SuperNode with node ID {node_ids[1]} could not be activated." in link_log
    restarted = logs / f"supernode-1-restarted-{refused}.log"
    assert supernode_id(restarted) == node_ids[1]
    assert _trains_done(restarted) >= 1
    recs = json.loads((restart_out / "metrics.json").read_text())["algorithms"]["clip21-gd"]
    assert [r["round"] for r in recs] == list(range(1, restart_cfg["rounds"] + 1))
    assert recs[-1]["accepted"] == NUM_NODES
    assert max(r["invariant_gap"] for r in recs) < 1e-12
    assert max(r["memory_gap"] for r in recs) < 1e-12  # the restarted node started from its own memory
    restart_log = procs.log_tail("flwr-run-restart", 10**7)
    assert f"node {node_ids[1]} now holds client 1: it is sent the server's copy of its memory" in restart_log
    assert "without proving it is that client" not in restart_log
    print(
        f"\n[deployment auth] node 1 killed mid-round, refused {refused} time(s), back with node id "
        f"{node_ids[1]} {back_after:.0f} s after the kill; rounds that lost a reply: "
        f"{[r['round'] for r in recs if r['failed']]}; resyncs: {[r['resyncs'] for r in recs]}"
    )
