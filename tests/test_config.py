"""Scenario resolution, data-building errors and the CLI's handling of bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    # bounds that keep the arithmetic finite and a run finite in time
    (["lr=1e308"], "lr", "1e+308"),
    (["sigma=1e308"], "sigma", "1e+308"),
    (["tau=1e308"], "tau", "1e+308"),
    (["message-norm-cap=1e308"], "message-norm-cap", "1e+308"),
    (["message-norm-cap=0"], "message-norm-cap", "0"),
    (["straggler-delay=1e300"], "straggler-delay", "1e+300"),
    (["round-timeout=1e300"], "round-timeout", "1e+300"),
    (["problem.spread=1e300"], "problem.spread", "1e+300"),
    (["problem.reg=1e300"], "problem.reg", "1e+300"),
    (["rounds=" + str(10**23)], "rounds", str(10**23)),
    (["rounds=1000001"], "rounds", "1000001"),
    (["local-steps=100000"], "local-steps", "100000"),
    (["num-cpus=1e-9"], "num-cpus", "1e-09"),
    (["num-cpus=1e300"], "num-cpus", "1e+300"),
    (["num-gpus=1e-9"], "num-gpus", "1e-09"),
    (["seed=4294967296"], "seed", "4294967296"),
    (["num-clients=10000000"], "num-clients", "10000000"),
    (["problem.dim=1000000000000"], "problem.dim", "1000000000000"),
    (["problem.rows=1000000000000"], "problem.rows", "1000000000000"),
    (["problem.features=1000000000000"], "problem.features", "1000000000000"),
    (["problem.hidden=1000000000000"], "problem.hidden", "1000000000000"),
    (["target-epsilon=1e300"], "target-epsilon", "1e+300"),
    (["target-epsilon=1e-9"], "target-epsilon", "1e-09"),
    # integers are integers, lists hold no value twice
    (["rounds=1e3"], "rounds", "1e3"),
    (["rounds=true"], "rounds", "true"),
    (["seeds=0,0,1"], "seeds", "[0, 0, 1]"),
    (["seeds=1.7,2.2"], "seeds", "1.7,2.2"),
    (["seeds=-1"], "seeds", "-1"),
    (["target-epsilon=3,3.0"], "target-epsilon", "[3.0, 3.0]"),
    (["target-epsilon=true"], "target-epsilon", "true"),
    # plug-ins are module.path:factory
    (["problem.name=:"], "problem.name", "':'"),
    (["problem.name=os:"], "problem.name", "'os:'"),
    (["problem.name=a b:c"], "problem.name", "'a b:c'"),
    (["problem.name=a..b:c"], "problem.name", "'a..b:c'"),
    # sigma too small for the accountant's epsilon
    (["sigma=1e-300", "algorithms=clip-gd"], "sigma", "1e-300"),
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
    ({"seeds": [1.7, 2.2]}, "seeds", "[1.7, 2.2]"),
    ({"seeds": True}, "seeds", "True"),
    ({"seeds": [0, True]}, "seeds", "[0, True]"),
    ({"seeds": ["0", "1"]}, "seeds", "['0', '1']"),
    ({"seeds": [0, 0, 1]}, "seeds", "[0, 0, 1]"),
    ({"target-epsilon": True}, "target-epsilon", "True"),
    ({"target-epsilon": [3, 3.0]}, "target-epsilon", "[3.0, 3.0]"),
    ({"target-epsilon": 1e300}, "target-epsilon", "1e+300"),
    ({"rounds": 1.5}, "rounds", "1.5"),
    ({"rounds": 3.0}, "rounds", "3.0"),
    ({"rounds": 10**23}, "rounds", str(10**23)),
    ({"lr": True}, "lr", "True"),
    ({"lr": 10**400}, "lr", "1000000"),
    ({"lr": 1e308}, "lr", "1e+308"),
    ({"problem": {"dim": 2.0}}, "problem.dim", "2.0"),
    ({"problem": {"name": "builtins:print", "when": __import__("datetime").date(2020, 1, 1)}}, "problem.when", "2020"),
]


@pytest.mark.parametrize("scenario,key,value", BAD_SCENARIO, ids=[repr(s[0]) for s in BAD_SCENARIO])
def test_bad_scenario_value_names_key_and_value(scenario, key, value):
    with pytest.raises(ConfigError) as ei:
        config.resolve(scenario)
    _assert_names(ei.value, key, value)


# --- coercion: integers are integers, numbers are not bools --------------------------------

INT_KEYS = [k for k, spec in config.SCHEMA.items() if spec.kind == "int"]
FLOAT_KEYS = [k for k, spec in config.SCHEMA.items() if spec.kind == "float"]


@given(key=st.sampled_from(INT_KEYS), x=st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_is_refused_for_an_int_key_from_toml(key, x):
    with pytest.raises(ConfigError) as ei:
        config.resolve(_nested(key, x))
    assert key in str(ei.value)


@given(key=st.sampled_from(INT_KEYS), x=st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v)))
def test_a_float_that_is_not_an_integer_is_refused_for_an_int_key_from_text(key, x):
    with pytest.raises(ConfigError) as ei:
        config.resolve({}, {key: repr(x)})
    _assert_names(ei.value, key, repr(x))


@given(n=st.integers(min_value=1, max_value=config.MAX_ROUNDS))
def test_any_integer_in_range_is_taken_as_is_from_toml_and_from_text(n):
    assert config.resolve({"rounds": n})["rounds"] == n
    got = config.resolve({}, {"rounds": str(n)})["rounds"]
    assert got == n and type(got) is int


@pytest.mark.parametrize("key", [*INT_KEYS, *FLOAT_KEYS, "seeds", "target-epsilon"])
@pytest.mark.parametrize("flag", [True, False])
def test_a_bool_is_no_number(key, flag):
    with pytest.raises(ConfigError) as ei:
        config.resolve(_nested(key, flag))
    _assert_names(ei.value, key, repr(flag))


@given(seeds=st.lists(st.integers(min_value=0, max_value=config.MAX_SEED), min_size=1, max_size=6, unique=True))
def test_distinct_seeds_are_kept_in_order_and_a_repeated_one_is_refused(seeds):
    assert config.resolve({"seeds": seeds})["seeds"] == seeds
    assert config.resolve({}, {"seeds": ",".join(map(str, seeds))})["seeds"] == seeds
    with pytest.raises(ConfigError) as ei:
        config.resolve({"seeds": [*seeds, seeds[0]]})
    assert "seeds" in str(ei.value) and "repeat" in str(ei.value)


def _nested(key: str, value: object) -> dict:
    """``{"problem": {"dim": v}}`` for ``problem.dim``: a scenario as TOML gives it."""
    table, _, leaf = key.rpartition(".")
    return {table: {leaf: value}} if table else {key: value}


# --- the name key names a folder -----------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "..\\up", "a\x00b"])
def test_name_must_be_a_plain_file_name(name):
    with pytest.raises(ConfigError) as ei:
        config.resolve({"name": name})
    _assert_names(ei.value, "name", repr(name))


@pytest.mark.parametrize("name", ["logreg-nonconvex", "a=b", "run 1", ".hidden", "ε-grid"])
def test_a_plain_file_name_is_a_good_name(name):
    assert config.resolve({"name": name})["name"] == name


# --- target-epsilon --------------------------------------------------------------------------


def test_with_epsilon_names_target_epsilon_when_out_of_range():
    cfg = config.resolve({"rounds": 10})
    with pytest.raises(ConfigError) as ei:
        config.with_epsilon(cfg, 1e300)
    _assert_names(ei.value, "target-epsilon", "1e+300")


def test_with_epsilon_names_target_epsilon_when_sigma_would_pass_its_cap():
    cfg = config.resolve({"rounds": 10**6, "tau": 1e12})
    with pytest.raises(ConfigError) as ei:
        config.with_epsilon(cfg, 0.01)
    _assert_names(ei.value, "target-epsilon", "0.01")
    assert "sigma" in str(ei.value)


def test_a_calibrated_epsilon_keeps_its_run():
    runs = config.expand_runs(
        config.resolve({"algorithms": ["clip-sgd"], "rounds": 10, "target-epsilon": [3, 9], "seeds": [0, 1]})
    )
    assert [(r["target-epsilon"], r["seed"]) for r in runs] == [([3.0], 0), ([3.0], 1), ([9.0], 0), ([9.0], 1)]
    assert all(0 < r["sigma"] <= config.MAX_SCALE for r in runs)


def test_a_diverging_run_within_the_bounds_reports_inf_instead_of_crashing():
    from fl_clip21.engine import run_local

    # lr = 3 on f_i(x) = |x - a_i|^2 / 2: x - a doubles every round and passes 1e154 (whose square overflows)
    cfg = config.resolve({"lr": 3.0, "rounds": 600, "num-clients": 3, "problem": {"centers": [[-1.0], [-1.0], [10.0]]}})
    last = run_local(cfg, "gd")["records"][-1]
    assert last["grad_norm_sq"] == np.inf and last["loss"] == np.inf


# --- scenario files ----------------------------------------------------------------------------


def test_binary_scenario_file_is_a_config_error(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b"rounds = 3\n\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as ei:
        config.load_scenario(path)
    assert str(path) in str(ei.value) and "UTF-8" in str(ei.value)


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
# Each seen as a traceback, a hang or a partial output before it was checked.
CLI_HOSTILE = [
    ("lr=1e308", "lr", "1e+308"),
    ("sigma=1e308", "sigma", "1e+308"),
    ("num-cpus=1e-9", "num-cpus", "1e-09"),
    ("rounds=" + str(10**23), "rounds", str(10**23)),
    ("problem.dim=100000000", "problem.dim", "100000000"),
    ("problem.name=os:system", "problem.name", "os:system"),
    ("problem.name=builtins:print", "problem.name", "builtins:print"),
    ("problem.name=:", "problem.name", "':'"),
    ("target-epsilon=1e300", "target-epsilon", "1e+300"),
    ("seeds=0,0,1", "seeds", "[0, 0, 1]"),
    ("name=..", "name", "'..'"),
]


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


@pytest.mark.parametrize("item,key,value", CLI_HOSTILE, ids=[c[0][:40] for c in CLI_HOSTILE])
def test_cli_hostile_input_exits_2_naming_key_and_value(item, key, value, tmp_path):
    out = tmp_path / "o"
    # centres drawn from problem.dim (1000 clients) in the memory benchmark's scenario
    scenario = "scenarios/bench/memory.toml" if key == "problem.dim" else str(SCENARIO.relative_to(REPO))
    proc = _cli("run", scenario, "--set", item, "--engine", "vectorized", "--out", str(out), timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert key in proc.stderr and value in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_run_of_more_work_than_max_work_is_refused_naming_the_keys(tmp_path):
    # Before: rounds=1e6 with num-clients=1e6 was accepted and ran (each key within its own bound).
    from fl_clip21.config import MAX_WORK, WORK_OVERHEAD, check_work, load_scenario, parse_sets

    scenario = tmp_path / "s.toml"
    scenario.write_text('algorithms = ["clip21-gd"]\n[problem]\nname = "mean-estimation"\ndim = 10\n')
    sets = ["rounds=1000000", "num-clients=1000000"]
    cfg = load_scenario(scenario, parse_sets(sets))
    with pytest.raises(ConfigError, match=r"rounds=1000000 x num-clients=1000000 x \(d=10 \+ 32\) = 4.2e\+13 "):
        check_work(cfg, 10)
    check_work({**cfg, "fraction": 1 / 64}, 10)  # 15,625 clients a round: within the bound
    assert 1000 * 1000 * (10_001 + WORK_OVERHEAD) < MAX_WORK  # a long study at the benchmarks' largest sizes runs
    out = tmp_path / "o"
    proc = _cli("run", str(scenario), *(a for s in sets for a in ("--set", s)), "--engine", "vectorized",
                "--out", str(out), timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "rounds=1000000 x num-clients=1000000" in proc.stderr and "more than 1e+12" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_cli_binary_scenario_exits_2(tmp_path):
    scenario, out = tmp_path / "s.toml", tmp_path / "o"
    scenario.write_bytes(bytes(range(256)))
    proc = _cli("run", str(scenario), "--engine", "vectorized", "--out", str(out))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert str(scenario) in proc.stderr and "UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_cli_run_help_says_plugins_are_code_and_names_the_node_restrictions():
    proc = _cli("run", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert 'problem.name = "module.path:factory" imports module.path and runs factory(scenario)' in text
    assert "data-dir" in text and "plugin-modules" in text


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
