"""Data files on separate machines: a SuperNode's ``data-dir`` node config.

The rule (``fl_clip21.config.with_data_dir``): a node with ``data-dir=D`` opens
``D/<file name>`` for every data file the scenario names; a node without it opens the
scenario's path. Flower's simulation engine gives every node only ``partition-id`` and
``num-partitions``, so the simulation test adds ``data-dir`` per node with a client
mod, in front of the same ClientApp a SuperNode runs.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.datasets import dump_svmlight_file, load_breast_cancer

from fl_clip21 import config, problems
from fl_clip21.config import DATA_DIR, ConfigError, with_data_dir


def _scenario(**problem) -> dict:
    return config.resolve({"num-clients": 3, "problem": problem})


# --- the rule -----------------------------------------------------------------------


def test_without_data_dir_the_scenario_path_is_used(tmp_path):
    cfg = _scenario(centers=str(tmp_path / "elsewhere" / "c.npy"))
    assert with_data_dir(cfg, None) is cfg
    assert with_data_dir(cfg, "") is cfg


def test_data_files_are_looked_up_in_data_dir_by_file_name(tmp_path):
    node = tmp_path / "node"
    node.mkdir()
    np.save(node / "c.npy", np.zeros((3, 2)))
    (node / "a9a.txt").write_text("1 1:0.5\n")
    cfg = _scenario(centers="/srv/on/the/server/c.npy")
    cfg["problem.dataset"] = "/srv/on/the/server/a9a.txt"
    before = dict(cfg)
    got = with_data_dir(cfg, str(node))
    assert got["problem.centers"] == str(node / "c.npy")
    assert got["problem.dataset"] == str(node / "a9a.txt")
    assert cfg == before  # the caller's dict is left alone
    assert {k: v for k, v in got.items() if k not in config.DATA_FILE_KEYS} == {
        k: v for k, v in cfg.items() if k not in config.DATA_FILE_KEYS
    }


def test_inline_and_built_in_data_need_no_file(tmp_path):
    cfg = _scenario(centers=[[1.0], [2.0], [3.0]])
    assert cfg["problem.dataset"] == "breast_cancer"
    assert with_data_dir(cfg, str(tmp_path)) == cfg  # an empty data-dir is fine
    assert with_data_dir({**cfg, "problem.dataset": "digits", "problem.centers": None}, str(tmp_path))["problem.dataset"] == "digits"


def test_a_file_missing_from_data_dir_names_key_path_and_data_dir(tmp_path):
    cfg = _scenario(centers="/srv/on/the/server/centers.npy")
    with pytest.raises(ConfigError) as ei:
        with_data_dir(cfg, str(tmp_path))
    msg = str(ei.value)
    assert "problem.centers" in msg and str(tmp_path / "centers.npy") in msg and DATA_DIR in msg and str(tmp_path) in msg
    assert "/srv/on/the/server/centers.npy" in msg  # and what the scenario said


def test_data_dir_that_is_no_folder_names_it(tmp_path):
    cfg = _scenario(centers="c.npy")
    with pytest.raises(ConfigError) as ei:
        with_data_dir(cfg, str(tmp_path / "missing"))
    assert DATA_DIR in str(ei.value) and str(tmp_path / "missing") in str(ei.value)


def test_a_libsvm_dataset_from_data_dir_builds_the_same_problem(tmp_path):
    X, y = load_breast_cancer(return_X_y=True)
    server, node = tmp_path / "server", tmp_path / "node"
    server.mkdir(), node.mkdir()
    dump_svmlight_file(X, y, str(server / "bc.svm"))
    (node / "bc.svm").write_bytes((server / "bc.svm").read_bytes())
    cfg = config.resolve({"num-clients": 4, "problem": {"name": "logreg", "dataset": str(server / "bc.svm")}})
    here = problems.build_problem(cfg)
    there = problems.build_problem(with_data_dir(cfg, str(node)))
    w = {"w": np.linspace(-1, 1, X.shape[1] + 1)}
    for i in range(4):
        np.testing.assert_array_equal(there.client_grad(i, w)["w"], here.client_grad(i, w)["w"])


# --- in a real Flower simulation -----------------------------------------------------


def data_dir_mod(dirs: dict[int, str]):
    """Give node ``partition-id`` the node config ``data-dir=dirs[partition-id]``, as
    ``flower-supernode --node-config`` would."""

    def mod(msg, context, call_next):
        i = int(context.node_config["partition-id"])
        if i in dirs:
            context.node_config[DATA_DIR] = dirs[i]
        return call_next(msg, context)

    return mod


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_simulated_nodes_read_their_data_from_data_dir(tmp_path):
    from fl_clip21.flower.client import make_client_app
    from fl_clip21.flower.simulation import simulate

    # The server's file and the nodes' files differ, so the model shows which one the
    # clients used: GD with lr = 1 lands on the mean of the centres the clients hold.
    server_centers = np.array([[0.0], [0.0], [0.0], [0.0]])
    node_centers = np.array([[1.0], [2.0], [6.0], [100.0]])
    (tmp_path / "server").mkdir()
    np.save(tmp_path / "server" / "centers.npy", server_centers)
    dirs = {}
    for i in range(4):
        d = tmp_path / f"node-{i}"
        d.mkdir()
        if i < 3:  # node 3's data-dir lacks the file
            np.save(d / "centers.npy", node_centers)
        dirs[i] = str(d)
    cfg = config.resolve(
        {"algorithms": ["gd"], "rounds": 2, "lr": 1.0, "num-clients": 4,
         "problem": {"name": "mean-estimation", "centers": str(tmp_path / "server" / "centers.npy")}}
    )
    flwr_log, collect = logging.getLogger("flwr"), _Collect()
    flwr_log.addHandler(collect)
    try:
        res = simulate(cfg, client_app=make_client_app(train_mods=[data_dir_mod(dirs)]))["gd"]
    finally:
        flwr_log.removeHandler(collect)
    recs = res["records"]
    assert [(r["accepted"], r["failed"]) for r in recs] == [(3, 1), (3, 1)]
    np.testing.assert_allclose(res["params"]["x"], [3.0], rtol=1e-12)  # mean of 1, 2, 6: the nodes' files
    errors = [line for line in collect.lines if "replied with an error" in line]
    assert errors and all("problem.centers" in e and str(tmp_path / "node-3" / "centers.npy") in e for e in errors), collect.lines


def test_a_dataset_folder_is_looked_up_in_data_dir_by_its_name(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    table = datasets.Dataset.from_dict({"x": X.tolist(), "label": (X[:, 0] > 0).astype(int).tolist()})
    server, node = tmp_path / "server", tmp_path / "node"
    table.save_to_disk(server / "table")
    table.save_to_disk(node / "table")
    cfg = config.resolve({"num-clients": 4, "problem": {"name": "logreg", "dataset": str(server / "table") + "/"}})
    got = with_data_dir(cfg, str(node))
    assert got["problem.dataset"] == str(node / "table")  # a folder, like a file; a trailing '/' changes nothing
    here, there = problems.build_problem(cfg), problems.build_problem(got)
    w = {"w": np.linspace(-1, 1, 4)}
    for i in range(4):
        np.testing.assert_array_equal(there.client_grad(i, w)["w"], here.client_grad(i, w)["w"])
    with pytest.raises(ConfigError) as ei:
        with_data_dir(cfg, str(tmp_path))  # no folder 'table' there
    assert "problem.dataset" in str(ei.value) and str(tmp_path / "table") in str(ei.value)


def test_a_hub_dataset_name_is_not_looked_up_in_data_dir(tmp_path):
    cfg = config.resolve({"num-clients": 4, "problem": {"name": "logreg", "dataset": "flwrlabs/femnist"}})
    assert with_data_dir(cfg, str(tmp_path))["problem.dataset"] == "flwrlabs/femnist"
