"""examples/quickstart-clip21: Flower's quickstart-pytorch app, as FedAvg and converted to Clip21 (README)."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from packaging.requirements import Requirement

from fl_clip21.calibrate import suggest_tau
from fl_clip21.flower.strategy import Clip21Strategy

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "quickstart-clip21"
sys.path.insert(0, str(APP))

from pytorchexample import app as components  # noqa: E402
from pytorchexample.clip21 import server_app as clip21_server_app  # noqa: E402
from pytorchexample.inprocess import run_config, simulate  # noqa: E402
from pytorchexample.task import Net  # noqa: E402

SECTION = "## Adding Clip21 to an existing Flower app"
CONVERTED = ("pytorchexample/client_app.py", "pytorchexample/server_app.py")
ROUNDS = 2
NODES = 3  # 1500 digits: 500 a partition, 400 to train on and 100 to evaluate on


def _readme_diff() -> list[str]:
    section = (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```diff\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"the section holds {len(blocks)} diff blocks, not one"
    return blocks[0].splitlines()


def _files(diff: list[str]) -> dict[str, list[str]]:
    """The diff's lines per file, keyed by the path after ``+++ b/``."""
    assert diff and diff[0].startswith("--- a/"), diff[:1]
    files: dict[str, list[str]] = {}
    for i, line in enumerate(diff):
        if line.startswith("--- a/"):
            path = diff[i + 1].removeprefix("+++ b/")
            files[path] = []
        files[path].append(line)
    return files


def _unified(before: list[str], after: list[str], path: str) -> list[str]:
    return list(difflib.unified_diff(before, after, f"a/{path}", f"b/{path}", n=1, lineterm=""))


def test_the_readme_diff_is_the_real_difference_between_the_two_versions():
    files = _files(_readme_diff())
    assert list(files) == [*CONVERTED, "pyproject.toml"]
    for path in CONVERTED:
        name = Path(path).name
        fedavg = (APP / "pytorchexample" / "fedavg" / name).read_text().splitlines()
        clip21 = (APP / "pytorchexample" / "clip21" / name).read_text().splitlines()
        expected = _unified(fedavg, clip21, path)
        assert files[path] == expected, "README's diff of " + path + " should read:\n" + "\n".join(expected)
    # One pyproject serves both versions: its Clip21 lines are the README's + lines, each there once.
    after = (APP / "pyproject.toml").read_text().splitlines()
    added = [line[1:] for line in files["pyproject.toml"][2:] if line.startswith("+")]
    before = list(after)
    for line in added:
        assert line in before, f"README adds {line!r} to pyproject.toml; the example's pyproject.toml lacks it"
        before.remove(line)
    expected = _unified(before, after, "pyproject.toml")
    assert files["pyproject.toml"] == expected, "README's diff of pyproject.toml should read:\n" + "\n".join(expected)


class _Recorded(Clip21Strategy):
    """Clip21Strategy that keeps its instances, so that a test can read their history."""

    made: list[Clip21Strategy] = []

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        _Recorded.made.append(self)


@pytest.fixture(scope="module")
def fedavg_and_clip21():
    """FedAvg, then Clip21 with tau above every update, in one simulation of NODES nodes.

    At the quickstart's client lr 0.1 this CNN's first rounds are at the edge of
    stability (the update norms grow tenfold from round 1 to 3), and float
    rounding in round 1 grows into visible differences by round 2; at lr 0.02
    the training is stable, and what is compared is the aggregation.
    """
    config = run_config(num_server_rounds=ROUNDS, learning_rate=0.02)
    _Recorded.made.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clip21_server_app, "Clip21Strategy", _Recorded)
        fedavg, clip21 = simulate([("fedavg", config), ("clip21", {**config, "tau": 1e6})], NODES)
    (strategy,) = _Recorded.made
    return fedavg.result, clip21.result, strategy


def test_clip21_with_tau_above_every_update_and_server_lr_1_is_fedavg(fedavg_and_clip21):
    fedavg, clip21, strategy = fedavg_and_clip21
    a, b = fedavg.arrays.to_numpy_ndarrays(), clip21.arrays.to_numpy_ndarrays()
    assert [x.shape for x in a] == [x.shape for x in b] == [p.shape for p in Net().state_dict().values()]
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) < 1e-6  # float32 rounding (seen: 3e-8)
    assert strategy.num_clients == NODES  # n counted from the nodes, as FedAvg takes all of them
    assert [(r["accepted"], r["clip_fraction"], r["rejected"]) for r in strategy.history] == [(NODES, 0.0, 0)] * ROUNDS


def test_the_apps_train_metrics_are_in_the_strategys_history_and_result(fedavg_and_clip21):
    fedavg, clip21, strategy = fedavg_and_clip21
    for k in range(1, ROUNDS + 1):
        loss = fedavg.train_metrics_clientapp[k]["train_loss"]
        assert strategy.history[k - 1]["train_metrics"] == {"train_loss": pytest.approx(loss, rel=1e-5)}
        assert clip21.train_metrics_clientapp[k]["train_loss"] == pytest.approx(loss, rel=1e-5)
        assert clip21.train_metrics_clientapp[k]["fl_clip21.accepted"] == NODES  # beside the strategy's own
        assert 2.0 < loss < 2.4  # the mean cross-entropy of batches, near log(10) this early


def test_evaluate_metrics_are_aggregated_as_fedavg_does(fedavg_and_clip21):
    fedavg, clip21, _ = fedavg_and_clip21
    for k in range(1, ROUNDS + 1):
        assert dict(clip21.evaluate_metrics_clientapp[k]) == {
            key: pytest.approx(v, rel=1e-5) for key, v in fedavg.evaluate_metrics_clientapp[k].items()
        }
        assert set(fedavg.evaluate_metrics_clientapp[k]) == {"eval_loss", "eval_acc"}
    for k in range(ROUNDS + 1):  # the server's test set, from the initial model on
        assert dict(clip21.evaluate_metrics_serverapp[k]) == {
            key: pytest.approx(v, rel=1e-5) for key, v in fedavg.evaluate_metrics_serverapp[k].items()
        }


def test_the_probe_rounds_of_a_large_tau_suggest_tau(fedavg_and_clip21):
    _, clip21, strategy = fedavg_and_clip21
    first = strategy.history[0]
    # v_i = 0 in round 1: what clip21_mod would clip is the whole update x - y_i
    assert first["input_norm_q50"] == pytest.approx(first["update_norm_q50"])
    assert suggest_tau(first) == suggest_tau(clip21.train_metrics_clientapp[1]) == first["input_norm_q50"]
    assert first["update_norm_q10"] <= first["update_norm_q50"] <= first["update_norm_max"] < 1e6
    # the rule: the largest median of the probe's rounds, from the history or from the Result
    largest = max(r["input_norm_q50"] for r in strategy.history)
    assert suggest_tau(strategy.history) == suggest_tau(clip21.train_metrics_clientapp) == largest


@pytest.mark.usefixtures("flower_task")
def test_each_message_goes_to_the_clientapp_of_the_strategy_that_sent_it():
    arrays = ArrayRecord(Net().state_dict())

    def message(kind: str, **config) -> Message:
        return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=1, message_type=kind)

    clip21 = message(MessageType.TRAIN, **{"fl_clip21.tau": 1.0, "server-round": 1})
    assert components.client_app_for(clip21) is components.clip21_client.app
    assert components.client_app_for(message(MessageType.TRAIN, lr=0.1)) is components.fedavg_client.app
    assert components.client_app_for(message(MessageType.EVALUATE, **{"fl_clip21.tau": 1.0})) is components.fedavg_client.app
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"strategy": "fedprox"})
    with pytest.raises(ValueError, match="run config strategy must be one of 'fedavg', 'clip21', got 'fedprox'"):
        components.main(None, context)


def test_every_dependency_of_the_example_is_installed_so_flwr_run_installs_nothing():
    project = tomllib.loads((APP / "pyproject.toml").read_text())
    missing = []
    for spec in project["project"]["dependencies"]:
        req = Requirement(spec)
        wanted = [req]
        for extra in req.extras:  # flwr[simulation]: what the extra adds must be there too
            wanted += [
                r for r in map(Requirement, metadata.requires(req.name) or [])
                if r.marker is not None and r.marker.evaluate({"extra": extra})
            ]
        for r in wanted:
            try:
                version = metadata.version(r.name)
            except metadata.PackageNotFoundError:
                missing.append(f"{r} (not installed)")
                continue
            if not r.specifier.contains(version, prereleases=True):
                missing.append(f"{r} (installed: {version})")
    assert not missing, missing
    components_ = project["tool"]["flwr"]["app"]["components"]
    assert components_ == {"serverapp": "pytorchexample.app:server", "clientapp": "pytorchexample.app:client"}


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_flwr_run_runs_both_versions_offline(tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert flwr, "the flwr CLI is installed with flwr"
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(flwr).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    pyproject_before = (APP / "pyproject.toml").read_text()
    logs = {}
    try:
        for strategy in ("fedavg", "clip21"):
            proc = subprocess.run(
                [
                    flwr, "run", str(APP), "--stream",
                    "--run-config", f"strategy='{strategy}' num-server-rounds=1 tau=1e6",
                    "--federation-config", "num-supernodes=2",
                ],
                env=env, capture_output=True, text=True, timeout=600,
            )
            assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
            logs[strategy] = proc.stdout + proc.stderr
    finally:
        for pid in _pids_mentioning(str(home)):  # the local SuperLink flwr run started
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert (APP / "pyproject.toml").read_text() == pyproject_before
    assert "Starting FedAvg strategy" in logs["fedavg"] and "train_loss" in logs["fedavg"]
    # what "Choosing tau" reads: round 1's median norm, in the log of the Clip21 version
    assert "Starting Clip21Strategy strategy" in logs["clip21"]
    assert "fl_clip21.input_norm_q50" in logs["clip21"] and "eval_acc" in logs["clip21"]
