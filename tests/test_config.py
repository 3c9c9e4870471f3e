"""Scenario resolution, data-building errors and the CLI's handling of bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_clip21 import config, problems
from fl_clip21.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "scenarios" / "mean-estimation.toml"


def _assert_names(err: BaseException, key: str, value: str) -> None:
    msg = str(err)
    assert key in msg, f"message does not name the key {key!r}: {msg!r}"
    assert value in msg, f"message does not name the value {value!r}: {msg!r}"


# --- resolve: defaults and coercion -------------------------------------------------


def test_defaults_fill_in():
    cfg = config.resolve({})
    assert set(cfg) == set(config.SCHEMA)
    for key, spec in config.SCHEMA.items():
        assert cfg[key] == spec.default, key
    assert cfg["rounds"] == 100 and cfg["tau"] == 1.0 and cfg["lr"] == 0.1
    assert cfg["problem.name"] == "mean-estimation"
    assert cfg["partition.kind"] == "iid"


def test_scenario_values_override_defaults_and_tables_flatten():
    cfg = config.resolve({"rounds": 7, "tau": 2, "problem": {"name": "logreg", "reg": 0.5}, "partition": {"kind": "dirichlet"}})
    assert cfg["rounds"] == 7
    assert cfg["tau"] == 2.0 and isinstance(cfg["tau"], float)
    assert cfg["problem.name"] == "logreg" and cfg["problem.reg"] == 0.5
    assert cfg["partition.kind"] == "dirichlet"
    assert cfg["lr"] == 0.1  # untouched default


def test_parse_sets_and_resolve_coerce_types():
    sets = config.parse_sets(
        [
            "tau=0.5",
            "rounds=7",
            "lr = 2",
            "seed=3",
            "fraction=0.25",
            "algorithms=gd, clip21-gd",
            "audit=true",
            "problem.dim=4",
            "partition.kind=dirichlet",
            "partition.alpha=0.3",
            "name=a=b",
        ]
    )
    assert sets["tau"] == "0.5" and sets["lr"] == "2" and sets["name"] == "a=b"
    cfg = config.resolve({"rounds": 50, "tau": 3.0}, sets)
    assert cfg["tau"] == 0.5 and type(cfg["tau"]) is float
    assert cfg["rounds"] == 7 and type(cfg["rounds"]) is int  # --set beats the scenario
    assert cfg["lr"] == 2.0 and type(cfg["lr"]) is float
    assert cfg["seed"] == 3 and type(cfg["seed"]) is int
    assert cfg["fraction"] == 0.25
    assert cfg["algorithms"] == ["gd", "clip21-gd"]
    assert cfg["audit"] is True
    assert cfg["problem.dim"] == 4 and type(cfg["problem.dim"]) is int
    assert cfg["partition.kind"] == "dirichlet" and cfg["partition.alpha"] == 0.3
    assert cfg["name"] == "a=b"


@pytest.mark.parametrize("item", ["tau", "=3", "", "  =1"])
def test_parse_sets_rejects_malformed(item):
    with pytest.raises(ConfigError) as ei:
        config.parse_sets([item])
    assert repr(item) in str(ei.value)


# --- resolve: every bad value names key and value -----------------------------------

BAD_OVERRIDES = [
    # (--set items, key named, value named)
    (["bogus=1"], "bogus", "1"),
    (["problem.bogus=3"], "problem.bogus", "3"),
    (["rounds=abc"], "rounds", "abc"),
    (["rounds=1.5"], "rounds", "1.5"),
    (["tau=x"], "tau", "x"),
    (["tau=-1"], "tau", "-1"),
    (["tau=0"], "tau", "0"),
    (["tau=nan"], "tau", "nan"),
    (["lr=0"], "lr", "0"),
    (["lr=-0.1"], "lr", "-0.1"),
    (["rounds=0"], "rounds", "0"),
    (["rounds=-4"], "rounds", "-4"),
    (["fraction=0"], "fraction", "0"),
    (["fraction=1.5"], "fraction", "1.5"),
    (["algorithms=gd,nope"], "algorithms", "nope"),
    (["algorithms=gd,gd"], "algorithms", "gd"),
    (["partition.kind=stripes"], "partition.kind", "stripes"),
    (["problem.name=cnn"], "problem.name", "cnn"),
    (["seed=-1"], "seed", "-1"),
    (["num-clients=0"], "num-clients", "0"),
    (["audit=maybe"], "audit", "maybe"),
    (["partition.alpha=0"], "partition.alpha", "0"),
]


@pytest.mark.parametrize("sets,key,value", BAD_OVERRIDES, ids=[s[0][0] for s in BAD_OVERRIDES])
def test_bad_override_names_key_and_value(sets, key, value):
    with pytest.raises(ConfigError) as ei:
        config.resolve({}, config.parse_sets(sets))
    _assert_names(ei.value, key, value)


BAD_SCENARIO = [
    ({"bogus": 1}, "bogus", "1"),
    ({"rounds": "abc"}, "rounds", "abc"),
    ({"rounds": 2.5}, "rounds", "2.5"),
    ({"rounds": True}, "rounds", "True"),
    ({"tau": "x"}, "tau", "x"),
    ({"tau": -1.0}, "tau", "-1"),
    ({"tau": 0}, "tau", "0"),
    ({"lr": 0.0}, "lr", "0"),
    ({"rounds": 0}, "rounds", "0"),
    ({"fraction": 0}, "fraction", "0"),
    ({"fraction": 1.5}, "fraction", "1.5"),
    ({"algorithms": ["gd", "nope"]}, "algorithms", "nope"),
    ({"algorithms": []}, "algorithms", "[]"),
    ({"partition": {"kind": "stripes"}}, "partition.kind", "stripes"),
    ({"problem": {"centers": 3}}, "problem.centers", "3"),
]


@pytest.mark.parametrize("scenario,key,value", BAD_SCENARIO, ids=[repr(s[0]) for s in BAD_SCENARIO])
def test_bad_scenario_value_names_key_and_value(scenario, key, value):
    with pytest.raises(ConfigError) as ei:
        config.resolve(scenario)
    _assert_names(ei.value, key, value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_load_scenario_resolves_relative_paths_against_scenario_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "c.npy", np.zeros((3, 2)))
    scen = tmp_path / "sub" / "s.toml"
    scen.write_text('num-clients = 3\n[problem]\ncenters = "c.npy"\n')
    cfg = config.load_scenario(scen)
    assert Path(cfg["problem.centers"]) == (tmp_path / "sub" / "c.npy").resolve()
    problem = problems.build_problem(cfg)
    assert problem.num_clients == 3


def test_load_scenario_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        config.load_scenario(missing)
    assert str(missing) in str(ei.value)


# --- build_problem: data errors -------------------------------------------------------


def test_more_clients_than_rows(tmp_path):
    cfg = config.resolve({"num-clients": 600, "problem": {"name": "logreg", "dataset": "breast_cancer"}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    _assert_names(ei.value, "num-clients", "600")
    assert "569" in str(ei.value)


def test_centers_file_missing(tmp_path):
    missing = tmp_path / "does-not-exist.npy"
    cfg = config.resolve({"num-clients": 3, "problem": {"centers": str(missing)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    _assert_names(ei.value, "problem.centers", str(missing))


def test_centers_file_not_2d(tmp_path):
    path = tmp_path / "one-d.npy"
    np.save(path, np.array([1.0, 2.0, 3.0]))
    cfg = config.resolve({"num-clients": 3, "problem": {"centers": str(path)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    _assert_names(ei.value, "problem.centers", str(path))
    assert "2-D" in str(ei.value)


def test_centers_rows_differ_from_num_clients(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.zeros((3, 2)))
    cfg = config.resolve({"num-clients": 5, "problem": {"centers": str(path)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    _assert_names(ei.value, "num-clients", "5")
    assert "3" in str(ei.value)


def test_centers_file_not_npy(tmp_path):
    path = tmp_path / "c.npy"
    path.write_text("not an array")
    cfg = config.resolve({"num-clients": 3, "problem": {"centers": str(path)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    _assert_names(ei.value, "problem.centers", str(path))


def test_inline_centers_ragged():
    cfg = config.resolve({"num-clients": 2, "problem": {"centers": [[1.0, 2.0], [3.0]]}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    assert "problem.centers" in str(ei.value)


def test_inline_centers_build():
    cfg = config.resolve({"num-clients": 3, "problem": {"centers": [[-1.0], [-1.0], [10.0]]}})
    problem = problems.build_problem(cfg)
    assert problem.num_clients == 3
    x = {"x": np.array([0.5])}
    np.testing.assert_allclose(problem.client_grad(2, x)["x"], [-9.5])
    np.testing.assert_allclose(problem.grad(x)["x"], [0.5 - 8.0 / 3.0])


# --- the CLI, end to end ---------------------------------------------------------------


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _bad_input(case: str, tmp_path: Path) -> tuple[str, str, str]:
    """(--set item, key the error must name, value it must name)."""
    if case == "centers-missing":
        p = str(tmp_path / "missing.npy")
        return f"problem.centers={p}", "problem.centers", p
    if case == "centers-1d":
        p = tmp_path / "one-d.npy"
        np.save(p, np.array([-1.0, -1.0, 10.0]))
        return f"problem.centers={p}", "problem.centers", str(p)
    key, _, value = case.partition("=")
    named = "nope" if key == "algorithms" else value
    return case, key, named


CLI_CASES = ["tau=-1", "lr=0", "rounds=0", "bogus=1", "algorithms=gd,nope", "centers-missing", "centers-1d", "rounds=abc"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_exits_2_before_running(case, tmp_path):
    item, key, value = _bad_input(case, tmp_path)
    out = tmp_path / "out"
    proc = _cli("run", str(SCENARIO.relative_to(REPO)), "--set", item, "--out", str(out), timeout=30)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert key in proc.stderr, proc.stderr
    assert value in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
    assert "round" not in proc.stdout  # nothing was simulated


def test_cli_run_help_lists_keys():
    proc = _cli("run", "--help")
    assert proc.returncode == 0, proc.stderr
    for key in ["tau", "lr", "rounds", "seed", "algorithms", "problem.centers"]:
        assert re.search(rf"^\s+{re.escape(key)}\s", proc.stdout, re.M), f"{key} not listed in:\n{proc.stdout}"


def test_cli_unsatisfiable_dirichlet_split_exits_2(tmp_path):
    # flwr-datasets' DirichletPartitioner gives up (ValueError) on this split:
    # 10 clients, 2 classes, alpha = 0.1, seed = 1. The CLI must report it as a
    # scenario error (exit 2, no traceback), like every other data error.
    out = tmp_path / "out"
    proc = _cli(
        "run", "scenarios/logreg-nonconvex.toml",
        "--set", "partition.kind=dirichlet", "--set", "partition.alpha=0.1", "--set", "seed=1",
        "--out", str(out), timeout=60,
    )
    assert not out.exists()
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "partition.alpha" in proc.stderr and "0.1" in proc.stderr
