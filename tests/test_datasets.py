"""Dataset tables (fl_clip21.datasets): parquet, CSV and saved folders, Hub names offline.

Every test writes its own small table: 200 rows, five numeric features (as the
scalar columns f0..f4 and as the list column x), a binary and a 3-class label, a
writer_id of 4 writers with uneven shares, and a column of strings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from fl_clip21 import config, problems
from fl_clip21.config import ConfigError
from fl_clip21.engine import run_local

REPO = Path(__file__).resolve().parent.parent
ROWS = 200
WRITERS = ("w0", "w1", "w2", "w3")
FEATURES = "f0,f1,f2,f3,f4"
# Nothing a test runs may reach the network: the Hub, nor flwr-datasets' telemetry.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    """datasets' cache of loaded parquet and CSV files in the test's folder, not the user's."""
    datasets.disable_progress_bars()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _columns(seed: int = 0, rows: int = ROWS) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 5))
    score = X @ np.array([1.5, -1.0, 0.5, 0.0, 2.0]) + 0.3 * rng.normal(size=rows)
    return {
        **{f"f{j}": X[:, j].tolist() for j in range(5)},
        "x": X.tolist(),
        "label": (score > 0).astype(int).tolist(),
        "label3": np.digitize(score, np.quantile(score, [1 / 3, 2 / 3])).tolist(),
        "writer_id": rng.choice(WRITERS, size=rows, p=[0.4, 0.3, 0.2, 0.1]).tolist(),
        "name": [f"row-{i}" for i in range(rows)],
    }


def _write(folder: Path, how: str, columns: dict[str, list] | None = None) -> Path:
    """The table as ``how``: parquet, csv (scalar columns), saved (save_to_disk), or with a test split:
    parquet-dir (train.parquet, test.parquet), saved-dict (a DatasetDict's save_to_disk)."""
    ds = datasets.Dataset.from_dict(columns or _columns())
    test = datasets.Dataset.from_dict(_columns(seed=1, rows=60))
    folder.mkdir(parents=True, exist_ok=True)
    if how == "parquet":
        ds.to_parquet(folder / "table.parquet")
        return folder / "table.parquet"
    if how == "csv":
        ds.remove_columns(["x"]).to_csv(folder / "table.csv", index=False)
        return folder / "table.csv"
    if how == "saved":
        ds.save_to_disk(folder / "table")
    elif how == "parquet-dir":
        (folder / "table").mkdir()
        ds.to_parquet(folder / "table" / "train.parquet")
        test.to_parquet(folder / "table" / "test.parquet")
    else:
        datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(folder / "table")
    return folder / "table"


def _cfg(src: Path | str, name: str = "logreg", clients: int = 4, **keys: object) -> dict:
    """A resolved scenario on ``src``; ``keys`` are --set items with '_' for '.' and '-' (features_column)."""
    scenario = {
        "algorithms": ["gd", "clip21-gd"], "rounds": 30, "lr": 1.0, "tau": 0.5, "seed": 0, "num-clients": clients,
        "problem": {"name": name, "dataset": str(src), "features-column": FEATURES, "hidden": 8},
        "partition": {"id-column": "writer_id"},
    }
    sets = {_key(k): str(v) for k, v in keys.items()}
    return config.resolve(scenario, sets)


def _key(name: str) -> str:
    section, _, rest = name.partition("_")
    return f"{section}.{rest.replace('_', '-')}" if section in ("problem", "partition") else name.replace("_", "-")


def _by_hand(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The features and binary labels of a parquet file, read with pyarrow alone."""
    t = pq.read_table(path)
    X = np.column_stack([t.column(f"f{j}").to_numpy() for j in range(5)])
    return X, t.column("label").to_numpy()


# --- loading, partitions, training --------------------------------------------------


@pytest.mark.parametrize("how", ["parquet", "saved"])
def test_natural_id_gives_each_client_exactly_the_rows_of_one_writer(tmp_path, how):
    src = _write(tmp_path, how)
    problem = problems.build_problem(_cfg(src, partition_kind="natural-id"))
    writers = np.array(_columns()["writer_id"])
    assert problem.num_clients == 4
    for i, writer in enumerate(sorted(WRITERS)):  # NaturalIdPartitioner: client i, the i-th smallest id
        np.testing.assert_array_equal(np.sort(problem.order[problem.parts[i]]), np.flatnonzero(writers == writer))
    sizes = [p.size for p in problem.parts]
    assert sum(sizes) == ROWS and len(set(sizes)) == 4  # uneven, as the writers are


def test_logreg_rows_are_the_rows_of_the_file(tmp_path):
    src = _write(tmp_path, "parquet")
    problem = problems.build_problem(_cfg(src))
    X, y = _by_hand(src)
    standardised = (X - X.mean(axis=0)) / X.std(axis=0)
    # The problem stores the rows client after client; ``order`` says which row of the file each is.
    np.testing.assert_allclose(problem.X[:, :-1], standardised[problem.order], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(problem.X[:, -1], 1.0)  # the bias column
    np.testing.assert_array_equal(problem.signs, 2.0 * y[problem.order] - 1.0)


@pytest.mark.parametrize("how", ["parquet", "saved", "csv"])
def test_the_formats_give_the_same_problem(tmp_path, how):
    reference = problems.build_problem(_cfg(_write(tmp_path / "ref", "parquet")))
    problem = problems.build_problem(_cfg(_write(tmp_path / how, how)))
    np.testing.assert_allclose(problem.X, reference.X, rtol=1e-12, atol=1e-12)
    for a, b in zip(problem.parts, reference.parts):
        np.testing.assert_array_equal(a, b)


def test_a_list_column_gives_the_features_of_its_scalar_columns(tmp_path):
    src = _write(tmp_path, "parquet")
    scalars = problems.build_problem(_cfg(src))
    listed = problems.build_problem(_cfg(src, problem_features_column="x"))
    np.testing.assert_array_equal(listed.X, scalars.X)


def test_no_features_column_takes_every_column_but_label_and_id(tmp_path):
    columns = _columns()
    del columns["name"], columns["label3"]
    src = _write(tmp_path, "parquet", columns)
    problem = problems.build_problem(_cfg(src, problem_features_column=""))
    assert problem.X.shape == (ROWS, 5 + 5 + 1)  # f0..f4, the 5 numbers of x, the bias


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural-id"])
@pytest.mark.parametrize("how", ["parquet", "saved"])
def test_logreg_trains_on_a_table(tmp_path, how, kind):
    cfg = _cfg(_write(tmp_path, how), partition_kind=kind, partition_alpha=1.0)
    problem = problems.build_problem(cfg)
    rows = np.concatenate(problem.parts)
    assert np.array_equal(np.sort(rows), np.arange(ROWS))  # every row, each to one client
    for name in cfg["algorithms"]:
        losses = [r["loss"] for r in run_local(cfg, name)["records"]]
        assert losses[-1] < losses[0] - 0.1, (name, losses[0], losses[-1])


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural-id"])
@pytest.mark.parametrize("how", ["parquet", "saved"])
def test_mlp_trains_on_a_three_class_table(tmp_path, how, kind):
    cfg = _cfg(_write(tmp_path, how), "mlp", problem_label_column="label3", partition_kind=kind, partition_alpha=1.0)
    problem = problems.build_problem(cfg)
    params = problem.init_params()
    assert params["0.weight"].shape == (8, 5) and params["2.weight"].shape == (3, 8)  # 5 -> hidden -> 3 classes
    assert problem.Xtr.shape[0] + problem.Xte.shape[0] == ROWS  # problem.test-fraction held out
    assert all(p.size > 0 for p in problem.parts)
    res = run_local(cfg, "clip21-gd")["records"]
    assert res[-1]["loss"] < res[0]["loss"] - 0.1
    assert res[-1]["accuracy"] > 0.6  # of 3 balanced classes


@pytest.mark.parametrize("how", ["parquet-dir", "saved-dict"])
def test_mlp_test_accuracy_is_on_the_test_split(tmp_path, how):
    src = _write(tmp_path, how)
    problem = problems.build_problem(_cfg(src, "mlp", problem_label_column="label3", problem_test_split="test"))
    assert problem.Xtr.shape == (ROWS, 5) and problem.Xte.shape == (60, 5)
    test = _columns(seed=1, rows=60)
    np.testing.assert_allclose(problem.Xte.numpy(), np.float32(test["x"]))
    np.testing.assert_array_equal(problem.yte.numpy(), test["label3"])


def test_string_labels_become_sorted_classes(tmp_path):
    columns = _columns()
    columns["label"] = ["yes" if v else "no" for v in columns["label"]]
    problem = problems.build_problem(_cfg(_write(tmp_path, "parquet", columns)))
    np.testing.assert_array_equal(problem.signs > 0, np.array(columns["label"])[problem.order] == "yes")  # "yes" > "no"


# --- paths: the scenario's folder, a node's data-dir, Hub names -------------------------


def test_relative_paths_are_taken_from_the_scenario_folder(tmp_path):
    _write(tmp_path / "scenario" / "data", "saved")
    scenario = tmp_path / "scenario" / "s.toml"
    scenario.write_text('[problem]\nname = "logreg"\ndataset = "data/table"\nfeatures-column = "x"\n')
    cfg = config.load_scenario(scenario)
    assert cfg["problem.dataset"] == str(tmp_path / "scenario" / "data" / "table")
    assert config.data_files(cfg) == {"problem.dataset": cfg["problem.dataset"]}


def test_a_hub_name_is_no_data_file(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text('[problem]\nname = "logreg"\ndataset = "ylecun/mnist"\n')
    cfg = config.load_scenario(scenario)
    assert cfg["problem.dataset"] == "ylecun/mnist"  # as FederatedDataset takes it, not a path
    assert config.data_files(cfg) == {}
    assert config.with_data_dir(cfg, str(tmp_path))["problem.dataset"] == "ylecun/mnist"
    # An existing folder of that name is local data.
    _write(tmp_path / "ylecun", "saved").rename(tmp_path / "ylecun" / "mnist")
    assert config.load_scenario(scenario)["problem.dataset"] == str(tmp_path / "ylecun" / "mnist")


def test_the_hub_offline_is_a_config_error_naming_the_name(tmp_path):
    # In a child process: the offline switches are read when the libraries are imported.
    script = (
        "from fl_clip21 import config, problems\n"
        "cfg = config.resolve({'num-clients': 4, 'problem': {'name': 'logreg', 'dataset': 'ylecun/mnist'}})\n"
        "problems.build_problem(cfg)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fl_clip21.config.ConfigError: problem.dataset 'ylecun/mnist' could not be loaded")
    assert "Hugging Face Hub (offline?" in last


# --- bad input ----------------------------------------------------------------------


def _nan_features() -> dict[str, list]:
    columns = _columns()
    columns["f3"][17] = float("nan")
    return columns


def _one_class() -> dict[str, list]:
    return {**_columns(), "label": [1] * ROWS}


BAD = [
    ("missing-feature", {"problem_features_column": "f0,f9"}, None, "problem.features-column", "f9"),
    ("missing-label", {"problem_label_column": "y"}, None, "problem.label-column", "'y'"),
    ("missing-id", {"partition_kind": "natural-id", "partition_id_column": "user"}, None, "partition.id-column", "'user'"),
    ("strings-as-features", {"problem_features_column": "f0,name"}, None, "problem.features-column", "'name'"),
    ("list-label", {"problem_label_column": "x", "problem_features_column": "f0"}, None, "problem.label-column", "'x'"),
    ("one-class", {}, _one_class, "problem.label-column", "'label'"),
    ("three-classes", {"problem_label_column": "label3"}, None, "problem.label-column",
     "'label3' must hold 2 classes for logreg, got 3"),
    ("nan-features", {}, _nan_features, "problem.features-column", "'f3'"),
    ("more-clients-than-rows", {"num_clients": 201}, None, "num-clients", "201"),
    ("other-writer-count", {"partition_kind": "natural-id", "num_clients": 5}, None, "num-clients", "5"),
    ("missing-split", {"problem_split": "validation"}, None, "problem.split", "'validation'"),
]


@pytest.mark.parametrize("keys, columns, key, named", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_tables_are_config_errors_naming_key_and_value(tmp_path, keys, columns, key, named):
    src = _write(tmp_path, "parquet", columns() if columns else None)
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(_cfg(src, **keys))
    msg = str(ei.value)
    assert key in msg and named in msg, msg
    if key != "num-clients":
        assert str(src) in msg, msg


def test_a_missing_test_split_names_it(tmp_path):
    src = _write(tmp_path, "saved")
    with pytest.raises(ConfigError, match=r"problem.test-split must be a split of .*\(train\), got 'test'"):
        problems.build_problem(_cfg(src, "mlp", problem_test_split="test"))


def test_lists_of_several_lengths_are_refused(tmp_path):
    columns = _columns()
    columns["x"][5] = columns["x"][5][:3]
    lengths = r"problem.features-column 'x': column 'x' \(List\(Value\('float64'\)\)\) must hold lists of one length"
    with pytest.raises(ConfigError, match=lengths + ", got lengths 3 to 5"):
        problems.build_problem(_cfg(_write(tmp_path, "parquet", columns), problem_features_column="x"))


def test_a_table_too_large_for_memory_is_refused_before_its_features_are_read(tmp_path, monkeypatch):
    from fl_clip21 import datasets as tables

    def no_read(*args, **kwargs):
        raise AssertionError("the features were read before the memory check")

    monkeypatch.setattr(tables, "_matrix", no_read)
    cfg = _cfg(_write(tmp_path, "parquet"), "mlp", clients=10**5, problem_hidden=10**6)
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    msg = str(ei.value)
    assert f"problem.dataset={str(tmp_path / 'table.parquet')!r} (200 rows x 5 features)" in msg
    assert "num-clients=100000" in msg and "of memory" in msg


@pytest.mark.parametrize("scenario, key, value", [
    ({"partition": {"kind": "natural-id"}}, "partition.id-column", "''"),
    ({"problem": {"test-split": "train"}}, "problem.test-split", "'train'"),
    ({"problem": {"features-column": "a,label"}}, "problem.features-column", "'a,label'"),
    ({"problem": {"features-column": "a,,b"}}, "problem.features-column", "'a,,b'"),
    ({"problem": {"label-column": ""}}, "problem.label-column", "''"),
    ({"partition": {"kind": "natural-id", "id-column": "w", "sizes": "linear"}}, "partition.sizes", "natural-id"),
])
def test_bad_table_keys_are_refused_when_resolved(scenario, key, value):
    with pytest.raises(ConfigError) as ei:
        config.resolve(
            {"problem": {"name": "logreg", **scenario.get("problem", {})}, "partition": scenario.get("partition", {})}
        )
    assert key in str(ei.value) and value in str(ei.value), str(ei.value)


def test_natural_id_on_data_without_ids_is_refused():
    cfg = config.resolve({"problem": {"name": "logreg"}, "partition": {"kind": "natural-id", "id-column": "writer_id"}})
    with pytest.raises(ConfigError, match=r"partition.kind 'natural-id' needs a dataset table .*'breast_cancer'"):
        problems.build_problem(cfg)


# --- the command line -----------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", *args], cwd=cwd, env={**os.environ, **OFFLINE, "HF_HOME": str(cwd / "hf")},
        capture_output=True, text=True, timeout=300,
    )


SCENARIO = """\
name = "writers"
algorithms = ["gd", "clip21-gd"]
rounds = 20
lr = 1.0
tau = 0.5
num-clients = 4

[problem]
name = "logreg"
dataset = "data/table"
features-column = "x"

[partition]
kind = "natural-id"
id-column = "writer_id"
"""


def test_cli_runs_a_scenario_on_a_saved_folder(tmp_path):
    _write(tmp_path / "scenarios" / "data", "saved")
    (tmp_path / "scenarios" / "writers.toml").write_text(SCENARIO)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    done = _cli("run", str(tmp_path / "scenarios" / "writers.toml"), "--engine", "vectorized", "--out", "out", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if not line.startswith(("[gd]", "[clip21-gd]"))]
    assert noise == []  # progress lines only: no warnings, no progress bars of datasets
    metrics = json.loads((elsewhere / "out" / "metrics.json").read_text())
    saved = json.loads((elsewhere / "out" / "config.json").read_text())
    assert saved["problem.dataset"] == str(tmp_path / "scenarios" / "data" / "table")
    for name in ("gd", "clip21-gd"):
        losses = [r["loss"] for r in metrics["algorithms"][name]]
        assert len(losses) == 20 and losses[-1] < losses[0] - 0.1, (name, losses)


@pytest.mark.parametrize("sets, key, value", [
    (["problem.dataset=ylecun/mnist"], "problem.dataset", "'ylecun/mnist' could not be loaded from the Hugging Face Hub"),
    (["problem.dataset={tmp}/broken.parquet"], "problem.dataset", "broken.parquet' could not be loaded as parquet"),
    (["problem.label-column=nope"], "problem.label-column", "'nope'"),
], ids=["hub-offline", "broken-parquet", "missing-column"])
def test_cli_bad_table_input_exits_2_with_one_line_and_writes_nothing(tmp_path, sets, key, value):
    _write(tmp_path / "scenarios" / "data", "saved")
    (tmp_path / "scenarios" / "writers.toml").write_text(SCENARIO)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    args = [a for s in sets for a in ("--set", s.format(tmp=tmp_path))]
    done = _cli("run", str(tmp_path / "scenarios" / "writers.toml"), *args, "--engine", "vectorized", "--out", "out", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fl-clip21: error: "), done.stderr  # no warnings before it
    assert key in lines[0] and value in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()


def test_the_readme_example_builds(tmp_path):
    readme = (REPO / "README.md").read_text()
    start = readme.index("num-clients = 4          # FEMNIST-style")
    example = readme[start:readme.index("```", start)]
    rng = np.random.default_rng(0)
    pixels = rng.random(size=(ROWS, 16))
    character = np.array(list("abc"))[pixels[:, :3].argmax(axis=1)]
    writer = np.repeat([f"writer-{i}" for i in range(4)], ROWS // 4)
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(
        {"pixels": pixels.tolist(), "character": character.tolist(), "writer_id": writer.tolist()}
    ).to_parquet(tmp_path / "data" / "writers.parquet")
    (tmp_path / "s.toml").write_text(example)
    problem = problems.build_problem(config.load_scenario(tmp_path / "s.toml"))
    assert problem.num_clients == 4 and (problem.inputs, problem.classes) == (16, 3)
    assert problem.Xte.shape[0] == 40  # test-fraction 0.2 of 200 rows
    # Each client holds the training rows of one writer (client i: writer-i), found by their pixels.
    row_of = {float(v): j for j, v in enumerate(pixels[:, 0].astype(np.float32))}
    for i, rows in enumerate(problem.parts):
        original = [row_of[float(v)] for v in problem.Xtr[rows, 0].numpy()]
        assert rows.size > 0 and set(writer[original]) == {f"writer-{i}"}
    assert sum(p.size for p in problem.parts) == 160


@pytest.mark.parametrize("name, label, k", [("logreg", "label", 1), ("mlp", "label3", 2)])
def test_pathological_gives_each_client_rows_of_its_classes_only(tmp_path, name, label, k):
    # flwr-datasets' PathologicalPartitioner, deterministic: client i holds classes (i + j) mod C, j < k
    cfg = _cfg(_write(tmp_path, "parquet"), name, clients=4, problem_label_column=label,
               partition_kind="pathological", partition_classes_per_client=k)
    problem = problems.build_problem(cfg)
    labels = problem.ytr.numpy() if name == "mlp" else (problem.signs > 0).astype(int)
    classes = np.unique(labels)
    rows = np.concatenate(problem.parts)
    assert np.array_equal(np.sort(rows), np.arange(len(labels)))  # every (training) row, each to one client
    for i, part in enumerate(problem.parts):
        assert set(labels[part]) == {int(classes[(i + j) % len(classes)]) for j in range(k)}, i
    losses = [r["loss"] for r in run_local(cfg, "clip21-gd")["records"]]
    assert losses[-1] < losses[0]


# --- MNIST-1D: generated offline by the mnist1d package ------------------------------------


def test_mnist1d_makes_the_rows_asked_for_of_40_features_and_10_digits():
    from fl_clip21.datasets import mnist1d

    X, y = mnist1d(1000, seed=0)
    assert X.shape == (1000, 40) and X.dtype == np.float64 and np.all(np.isfinite(X))
    assert np.bincount(y).tolist() == [100] * 10  # make_dataset makes as many rows of each digit
    odd, _ = mnist1d(1003, seed=0)  # 1010 made, the first 1003 kept
    assert odd.shape == (1003, 40)


def test_mnist1d_is_the_same_for_a_seed_and_leaves_the_global_generators_alone():
    import random

    from fl_clip21.datasets import mnist1d

    np.random.seed(123)
    random.seed(123)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    a, b, other = mnist1d(300, seed=5), mnist1d(300, seed=5), mnist1d(300, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], other[0])
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist() and random.getstate() == python_state


def test_mnist1d_reaches_no_network_and_writes_no_file(tmp_path, monkeypatch):
    import socket

    from fl_clip21.datasets import mnist1d

    def refuse(*args, **kwargs):
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.chdir(tmp_path)
    X, _ = mnist1d(200, seed=1)
    assert X.shape == (200, 40) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_mlp_and_cnn1d_train_on_mnist1d_rows_with_a_held_out_test_split(name):
    cfg = config.resolve({
        "num-clients": 8, "seed": 2, "problem": {"name": name, "dataset": "mnist1d", "rows": 500, "hidden": 8},
    })
    problem = problems.build_problem(cfg)
    assert problem.X.shape == (400, 40) and tuple(problem.Xte.shape) == (100, 40) and problem.classes == 10
    assert sorted(np.unique(problem.yte.numpy()).tolist()) == list(range(10))  # stratified
    assert sum(p.size for p in problem.parts) == 400


def test_too_few_mnist1d_rows_and_mnist1d_for_logreg_are_config_errors():
    few = config.resolve({"num-clients": 2, "problem": {"name": "mlp", "dataset": "mnist1d", "rows": 5}})
    with pytest.raises(ConfigError, match=r"problem.rows=5 .*mnist1d.* [1-5] of its 10 digits"):
        problems.build_problem(few)
    logreg = config.resolve({"problem": {"name": "logreg", "dataset": "mnist1d"}})
    with pytest.raises(ConfigError, match="'mnist1d' has 10 classes and logreg takes 2"):
        problems.build_problem(logreg)


def test_the_dp_scenarios_resolve_and_give_their_clients_the_rows_they_say():
    from fl_clip21.config import expand_runs, load_scenario

    paths = sorted((REPO / "scenarios" / "dp").glob("*.toml"))
    assert len(paths) == 12
    for path in paths:
        cfg = load_scenario(path)
        assert len(expand_runs(cfg)) == len(cfg["target-epsilon"]), path  # every epsilon calibrates
        if cfg["problem.dataset"] == "mnist1d":
            train = round(cfg["problem.rows"] * (1 - cfg["problem.test-fraction"]))
            assert train == {1000: 40, 5000: 30}[cfg["num-clients"]] * cfg["num-clients"], path
