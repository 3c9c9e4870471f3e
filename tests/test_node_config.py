"""What a SuperNode runs of the server's scenario: ``fl_clip21.config.with_node_config``.

A plug-in problem is code, and a node runs whatever the scenario names unless its
node config restricts it: ``plugin-modules`` (the modules whose plug-ins it runs)
and ``data-dir`` (where it opens the scenario's data files, by file name).
"""

from __future__ import annotations

import numpy as np
import pytest

from fl_clip21 import config, problems
from fl_clip21.config import DATA_DIR, PLUGIN_MODULES, ConfigError, with_node_config


def _scenario(name: str) -> dict:
    return config.resolve({"num-clients": 3, "problem": {"name": name}})


@pytest.mark.parametrize("node_config", [{}, {PLUGIN_MODULES: ""}, {PLUGIN_MODULES: None, DATA_DIR: ""}])
def test_an_unrestricted_node_runs_any_plugin(node_config):
    cfg = _scenario("anywhere.at_all:make")
    assert with_node_config(cfg, node_config) == cfg


@pytest.mark.parametrize("module", ["labplugins", "labplugins.vision", "labplugins.vision.cnn", "other"])
def test_plugin_modules_allow_a_module_and_the_modules_under_it(module):
    cfg = _scenario(f"{module}:make")
    assert with_node_config(cfg, {PLUGIN_MODULES: "labplugins, other"}) == cfg


@pytest.mark.parametrize("module", ["os", "labplugins_evil", "lab", "vision.labplugins", "otherwise"])
def test_a_plugin_from_any_other_module_is_refused_before_it_is_imported(module):
    cfg = _scenario(f"{module}:system")
    with pytest.raises(ConfigError) as ei:
        with_node_config(cfg, {PLUGIN_MODULES: "labplugins,other"})
    msg = str(ei.value)
    assert "problem.name" in msg and repr(f"{module}:system") in msg
    assert PLUGIN_MODULES in msg and "'labplugins,other'" in msg


def test_a_malformed_plugin_name_is_refused_on_a_restricted_node():
    cfg = {**_scenario("mean-estimation"), "problem.name": ":"}
    with pytest.raises(ConfigError) as ei:
        with_node_config(cfg, {PLUGIN_MODULES: "labplugins"})
    assert "problem.name" in str(ei.value) and "':'" in str(ei.value)


@pytest.mark.parametrize("name", ["mean-estimation", "logreg", "mlp"])
def test_built_in_problems_run_on_a_restricted_node(name):
    cfg = _scenario(name)
    assert with_node_config(cfg, {PLUGIN_MODULES: "labplugins"}) == cfg


@pytest.mark.parametrize("value", ["a b", "a,,b", "a.", "os:system", 3])
def test_plugin_modules_must_be_module_names(value):
    with pytest.raises(ConfigError) as ei:
        with_node_config(_scenario("mean-estimation"), {PLUGIN_MODULES: value})
    assert PLUGIN_MODULES in str(ei.value) and str(value) in str(ei.value)


def test_both_rules_apply_together(tmp_path):
    node = tmp_path / "node"
    node.mkdir()
    np.save(node / "centers.npy", np.array([[-1.0], [-1.0], [10.0]]))
    cfg = config.resolve({"num-clients": 3, "problem": {"centers": "/srv/elsewhere/centers.npy"}})
    got = with_node_config(cfg, {DATA_DIR: str(node), PLUGIN_MODULES: "labplugins", "partition-id": 0})
    assert got["problem.centers"] == str(node / "centers.npy")
    assert cfg["problem.centers"] == "/srv/elsewhere/centers.npy"  # the server's scenario is not changed
    np.testing.assert_array_equal(problems.build_problem(got).centers, [[-1.0], [-1.0], [10.0]])
    with pytest.raises(ConfigError) as ei:
        with_node_config(cfg, {DATA_DIR: str(tmp_path / "missing")})
    assert DATA_DIR in str(ei.value)


def test_a_plugin_outside_plugin_modules_is_never_imported(tmp_path, monkeypatch):
    import sys

    marker = tmp_path / "imported"
    (tmp_path / "fl21_spy_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef make(cfg): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _scenario("fl21_spy_plugin:make")
    with pytest.raises(ConfigError):
        problems.build_problem(with_node_config(cfg, {PLUGIN_MODULES: "labplugins"}))
    assert not marker.exists() and "fl21_spy_plugin" not in sys.modules


def test_the_flower_client_applies_the_node_config():
    import json

    from fl_clip21.flower.client import run_setup

    plugin = json.dumps(_scenario("fl21_not_allowed:make"))
    with pytest.raises(ConfigError) as ei:
        run_setup(plugin, "gd", None, "labplugins")
    assert PLUGIN_MODULES in str(ei.value)
    cfg, algorithm, problem = run_setup(json.dumps(_scenario("mean-estimation")), "gd", None, "labplugins")
    assert algorithm.name == "gd" and problem.num_clients == cfg["num-clients"] == 3
