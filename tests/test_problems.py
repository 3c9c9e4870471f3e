"""Problems: gradients against finite differences, partitions, LibSVM data."""

from __future__ import annotations

import warnings

import numpy as np
from dict_algorithm import client_init, client_update, server_init, server_update
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import pytest

from fl_clip21 import algorithms, config, core, problems
from fl_clip21.config import ConfigError


def _cfg(**over):
    """A resolved scenario; nested tables given as 'problem'/'partition' dicts."""
    return config.resolve(over)


# --- logistic regression ------------------------------------------------------------


@pytest.fixture(scope="module")
def logreg():
    cfg = _cfg(**{"num-clients": 5, "seed": 0, "problem": {"name": "logreg", "reg": 0.1}, "partition": {"kind": "iid"}})
    return problems.build_problem(cfg)


def _logreg_client_loss(problem, i, w):
    """f_i(w) = mean log(1 + exp(-y a^T w)) + reg * sum_j w_j^2 / (1 + w_j^2), in float64."""
    rows = problem.parts[i]
    z = problem.signs[rows] * (problem.X[rows] @ w)
    return float(np.mean(np.logaddexp(0.0, -z)) + problem.reg * np.sum(w**2 / (1 + w**2)))


def _central_diff(f, w, coords, h):
    out = []
    for j in coords:
        e = np.zeros_like(w)
        e[j] = h
        out.append((f(w + e) - f(w - e)) / (2 * h))
    return np.array(out)


def _logreg_point(problem, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.7, size=problem.X.shape[1])  # non-zero: the regulariser matters


def test_logreg_loss_is_mean_of_client_losses(logreg):
    w = _logreg_point(logreg)
    expected = np.mean([_logreg_client_loss(logreg, i, w) for i in range(logreg.num_clients)])
    assert logreg.loss({"w": w}) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("client", [0, 3])
def test_logreg_client_grad_matches_finite_differences(logreg, client):
    w = _logreg_point(logreg)
    grad = logreg.client_grad(client, {"w": w})["w"]
    assert grad.shape == w.shape and grad.dtype == np.float64
    coords = [0, 5, 17, w.size - 1]  # the last one is the bias column
    fd = _central_diff(lambda u: _logreg_client_loss(logreg, client, u), w, coords, 1e-6)
    np.testing.assert_allclose(grad[coords], fd, rtol=1e-6, atol=1e-8)


def test_logreg_global_grad_matches_finite_differences(logreg):
    w = _logreg_point(logreg, seed=2)
    grad = logreg.grad({"w": w})["w"]
    coords = [1, 8, 22, w.size - 1]
    fd = _central_diff(lambda u: logreg.loss({"w": u}), w, coords, 1e-6)
    np.testing.assert_allclose(grad[coords], fd, rtol=1e-6, atol=1e-8)


def test_logreg_global_grad_is_mean_of_client_grads(logreg):
    w = _logreg_point(logreg, seed=3)
    client = [logreg.client_grad(i, {"w": w})["w"] for i in range(logreg.num_clients)]
    np.testing.assert_allclose(logreg.grad({"w": w})["w"], np.mean(client, axis=0), rtol=1e-12, atol=1e-15)


def test_logreg_minibatch_grad_uses_batch_rows(logreg):
    from fl_clip21.problems import Minibatch

    w = _logreg_point(logreg, seed=4)
    rows = logreg.parts[1]
    g_full = logreg.client_grad(1, {"w": w})["w"]
    g_mb = logreg.client_grad(1, {"w": w}, Minibatch(seed=0, round=1, size=8))["w"]
    assert g_mb.shape == g_full.shape and np.all(np.isfinite(g_mb))
    assert not np.allclose(g_mb, g_full)  # a minibatch of 8 out of ~114 rows differs
    # it is the gradient of 8 of the client's rows, exactly
    picked, owner, _ = logreg.rows(np.array([1]), Minibatch(seed=0, round=1, size=8))
    assert picked.size == 8 and set(picked) <= set(rows) and (owner == 0).all()
    z = logreg.signs[picked] * (logreg.X[picked] @ w)
    by_hand = logreg.X[picked].T @ (-logreg.signs[picked] / (1 + np.exp(z))) / 8 + logreg._reg_grad(w)
    np.testing.assert_allclose(g_mb, by_hand, rtol=1e-12, atol=1e-15)
    # another round draws other rows; the same round the same rows, whatever else is computed with it
    assert not np.allclose(g_mb, logreg.client_grad(1, {"w": w}, Minibatch(seed=0, round=2, size=8))["w"])
    together = logreg.grads(w, np.arange(logreg.num_clients), Minibatch(seed=0, round=1, size=8))
    np.testing.assert_allclose(together[1], g_mb, rtol=1e-12, atol=1e-15)
    # batch_size >= rows: the full gradient
    g_all = logreg.client_grad(1, {"w": w}, Minibatch(seed=0, round=1, size=rows.size))["w"]
    np.testing.assert_array_equal(g_all, g_full)


# --- the torch MLP ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    cfg = _cfg(
        **{
            "num-clients": 4,
            "seed": 0,
            "problem": {"name": "mlp", "dataset": "digits", "hidden": 8},
            "partition": {"kind": "iid"},
        }
    )
    return problems.build_problem(cfg)


def _mlp_loss64(problem, params, rows):
    """Cross-entropy of the 64 -> hidden -> tanh -> 10 MLP, in float64 numpy."""
    X = problem.Xtr.numpy().astype(np.float64)[rows]
    y = problem.ytr.numpy()[rows]
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    h = np.tanh(X @ p["0.weight"].T + p["0.bias"])
    logits = h @ p["2.weight"].T + p["2.bias"]
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - logits[np.arange(len(y)), y]))


def _coords(grad: dict[str, np.ndarray], per_key: int = 3):
    """A few coordinates of every array: the largest-magnitude ones."""
    out = []
    for k, g in grad.items():
        flat = np.abs(g.ravel())
        for j in np.argsort(-flat)[:per_key]:
            out.append((k, int(j)))
    return out


def _perturbed(params, key, j, delta, dtype=np.float64):
    p = {k: np.array(v, dtype=dtype, copy=True) for k, v in params.items()}
    p[key].reshape(-1)[j] += delta
    return p


def test_mlp_numpy_model_matches_problem_loss(mlp):
    params = mlp.init_params()
    ours = np.mean([_mlp_loss64(mlp, params, rows) for rows in mlp.parts])
    assert mlp.loss(params) == pytest.approx(ours, rel=1e-5)


@pytest.mark.parametrize("client", [0, 2])
def test_mlp_client_grad_matches_finite_differences(mlp, client):
    params = mlp.init_params()
    grad = mlp.client_grad(client, params)
    assert set(grad) == set(params)
    for k in params:
        assert grad[k].shape == params[k].shape
    rows = mlp.parts[client]
    h = 1e-5
    for key, j in _coords(grad):
        fd = (
            _mlp_loss64(mlp, _perturbed(params, key, j, h), rows)
            - _mlp_loss64(mlp, _perturbed(params, key, j, -h), rows)
        ) / (2 * h)
        # float32 gradient against a float64 finite difference: loose rtol
        assert float(grad[key].ravel()[j]) == pytest.approx(fd, rel=1e-3, abs=1e-5), (key, j)


def test_mlp_global_grad_matches_finite_differences_of_problem_loss(mlp):
    params = mlp.init_params()
    grad = mlp.grad(params)
    h = 1e-2  # float32 loss: a large step keeps rounding error small
    for key, j in _coords(grad, per_key=2):
        plus = _perturbed(params, key, j, h, dtype=np.float32)
        minus = _perturbed(params, key, j, -h, dtype=np.float32)
        step = float(plus[key].ravel()[j]) - float(minus[key].ravel()[j])
        fd = (mlp.loss(plus) - mlp.loss(minus)) / step
        assert float(grad[key].ravel()[j]) == pytest.approx(fd, rel=3e-2, abs=2e-4), (key, j)


def test_mlp_global_grad_is_mean_of_client_grads(mlp):
    params = mlp.init_params()
    g = mlp.grad(params)
    clients = [mlp.client_grad(i, params) for i in range(mlp.num_clients)]
    for k in params:
        np.testing.assert_allclose(g[k], np.mean([c[k] for c in clients], axis=0), rtol=1e-5, atol=1e-7)


def test_mlp_init_params_deterministic_and_leaves_torch_rng_alone(mlp):
    import torch

    state = torch.random.get_rng_state()
    a = mlp.init_params()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = mlp.init_params()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# --- the 1-D CNN ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn():
    cfg = _cfg(**{
        "num-clients": 6, "seed": 0, "problem": {"name": "cnn1d", "dataset": "mnist1d", "rows": 600, "channels": 4},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "sizes": "even"},
    })
    return problems.build_problem(cfg)


def _torch_client_grad(problem, flat, client, rows=None):
    """Client ``client``'s gradient at ``flat`` by plain autograd on a torch module (no vmap, no functional_call)."""
    import torch

    model = problem._model()
    with torch.no_grad():
        for (name, param), value in zip(model.named_parameters(), problem.layout.unflatten(flat).values()):
            assert param.shape == value.shape, name
            param.copy_(torch.from_numpy(value))
    rows = problem.parts[client] if rows is None else rows
    loss = torch.nn.functional.cross_entropy(model(problem.Xtr[rows]), problem.ytr[rows])
    loss.backward()
    return np.concatenate([p.grad.numpy().ravel() for p in model.parameters()])


def test_cnn1d_has_the_parameters_its_size_counts(cnn):
    assert cnn.layout.size == problems._cnn1d_size(4) == 158
    assert problems._cnn1d_size(16) == 1562  # the default: about the mlp's 1642 at hidden = 32


def test_cnn1d_gradients_of_a_batch_of_clients_are_each_clients_own(cnn):
    rng = np.random.default_rng(0)
    base = cnn.layout.flatten(cnn.init_params())
    points = (base + rng.normal(0, 0.05, size=(cnn.num_clients, base.size))).astype(np.float32)
    clients = np.arange(cnn.num_clients)
    batched = cnn.grads(points, clients)
    for i in clients:
        np.testing.assert_allclose(batched[i], _torch_client_grad(cnn, points[i], i), rtol=1e-4, atol=1e-6)
    # minibatches: the rows Minibatch draws, each client's at its own point
    mb = problems.Minibatch(seed=3, round=2, size=16)
    drawn = cnn.grads(points, clients, mb)
    rows, owner, _ = cnn.rows(clients, mb)
    for i in clients:
        own = _torch_client_grad(cnn, points[i], i, rows[owner == i])
        np.testing.assert_allclose(drawn[i], own, rtol=1e-4, atol=1e-6)
    # f's gradient is the mean of the clients' at one point
    ev = cnn.evaluate(base)
    mean = np.mean([_torch_client_grad(cnn, base, i) for i in clients], axis=0)
    np.testing.assert_allclose(ev.grad, mean, rtol=1e-4, atol=1e-6)


def test_cnn1d_learns_mnist1d_without_noise():
    from fl_clip21.engine import run_local

    cfg = _cfg(**{
        "num-clients": 20, "rounds": 25, "lr": 0.3, "batch-size": 32, "seed": 0, "algorithms": ["sgd"],
        "problem": {"name": "cnn1d", "dataset": "mnist1d", "rows": 3000},
    })
    records = run_local(cfg, "sgd")["records"]
    assert records[-1]["accuracy"] > 0.3 and records[-1]["loss"] < records[0]["loss"]  # chance: 0.1


# --- partitions -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bc_labels():
    from sklearn.datasets import load_breast_cancer

    _, y = load_breast_cancer(return_X_y=True)
    return y.astype(np.int64)


def _parts(labels, kind, n=10, seed=0, **extra):
    partition = {"kind": kind, **extra}
    return problems.partition_indices(labels, _cfg(**{"num-clients": n, "seed": seed, "partition": partition}))


def _assert_disjoint(parts):
    allrows = np.concatenate(parts)
    assert len(np.unique(allrows)) == len(allrows), "a row is given to two clients"


COVERING = [("iid", {}), ("dirichlet", {"alpha": 0.1}), ("label-sorted", {})]


@pytest.mark.parametrize("kind,extra", COVERING, ids=[k for k, _ in COVERING])
def test_partition_disjoint_and_covers_all_rows(bc_labels, kind, extra):
    parts = _parts(bc_labels, kind, **extra)
    assert len(parts) == 10
    assert all(p.size > 0 for p in parts)
    _assert_disjoint(parts)
    allrows = np.sort(np.concatenate(parts))
    missing = np.setdiff1d(np.arange(len(bc_labels)), allrows)
    assert missing.size == 0, f"{kind}: {missing.size} of {len(bc_labels)} rows given to no client: {missing.tolist()}"


@pytest.mark.parametrize("kind,extra", COVERING, ids=[k for k, _ in COVERING])
def test_partition_deterministic_for_same_seed(bc_labels, kind, extra):
    a = _parts(bc_labels, kind, **extra)
    b = _parts(bc_labels, kind, **extra)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_partition_iid_differs_for_another_seed(bc_labels):
    a = _parts(bc_labels, "iid", seed=0)
    b = _parts(bc_labels, "iid", seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    # iid: sizes differ by at most one
    sizes = [p.size for p in a]
    assert max(sizes) - min(sizes) <= 1


def test_partition_pathological_two_classes_per_client():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        parts = _parts(labels, "pathological", n=10, **{"classes-per-client": 2})
        again = _parts(labels, "pathological", n=10, **{"classes-per-client": 2})
    assert len(parts) == 10
    _assert_disjoint(parts)
    for p in parts:
        assert p.size > 0
        assert len(np.unique(labels[p])) <= 2
    for x, y in zip(parts, again):
        np.testing.assert_array_equal(x, y)
    # 10 clients x 2 classes in the deterministic assignment use all 10 classes
    used = np.unique(labels[np.concatenate(parts)])
    assert used.tolist() == list(range(10))


def test_partition_pathological_too_many_classes_is_config_error(bc_labels):
    with pytest.raises(ConfigError) as ei:
        _parts(bc_labels, "pathological", **{"classes-per-client": 3})
    assert "partition.classes-per-client" in str(ei.value) and "3" in str(ei.value)


def test_label_sorted_gives_single_class_clients(bc_labels):
    parts = _parts(bc_labels, "label-sorted")
    pure = sum(len(np.unique(bc_labels[p])) == 1 for p in parts)
    assert pure >= 8


def test_dirichlet_unsatisfiable_split_is_config_error(bc_labels):
    # With alpha = 0.1 and 10 clients on 569 rows of 2 classes, flwr-datasets'
    # DirichletPartitioner cannot always give every client a row (seed 1 fails).
    # The project's rule (config.py): every data error is a ConfigError naming the
    # key and the value, so the CLI reports it instead of crashing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            parts = _parts(bc_labels, "dirichlet", seed=1, alpha=0.1)
        except ConfigError as e:
            assert "partition.alpha" in str(e) and "0.1" in str(e)
        else:  # a valid split is fine too
            _assert_disjoint(parts)
            assert all(p.size > 0 for p in parts)


# --- Dirichlet label skew at many clients ------------------------------------------------


def _flwr_inner(labels, sizes, alpha, seed):
    """flwr-datasets' own InnerDirichletPartitioner on ``labels`` (row positions per client, sorted)."""
    import datasets
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    datasets.disable_progress_bars()
    part = InnerDirichletPartitioner(partition_sizes=sizes, partition_by="label", alpha=alpha, seed=seed)
    part.dataset = datasets.Dataset.from_dict({"label": labels.tolist(), "row": list(range(labels.size))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [np.sort(np.asarray(part.load_partition(i)["row"])) for i in range(len(sizes))]


@given(
    n=st.integers(1, 12), per=st.integers(1, 9), classes=st.integers(2, 6), spare=st.integers(0, 5),
    alpha=st.sampled_from([0.05, 0.1, 0.5, 1.0, 10.0]), seed=st.integers(0, 2**31),
)
@settings(max_examples=40)
def test_inner_dirichlet_gives_flwr_datasets_partition(n, per, classes, spare, alpha, seed):
    # spare = 0: every row is given, so classes run out and the class mixes are renormalised.
    assume(n * per + spare >= classes)
    labels = np.random.default_rng(seed).integers(0, classes, n * per + spare)
    labels[:classes] = np.arange(classes)  # every class present, as the codes of a problem's labels are
    sizes = [per + (i % 3) for i in range(n)]
    sizes[-1] -= sum(sizes) - n * per
    assume(min(sizes) >= 1)
    try:
        ours = [np.sort(p) for p in problems.inner_dirichlet(labels, sizes, alpha, seed)]
    except ConfigError as e:  # a class mix of 0 on every class left (alpha < 0.1 draws exact zeros)
        assert "partition.alpha" in str(e)
        with pytest.raises(ValueError, match="NaN"):
            _flwr_inner(labels, sizes, alpha, seed)
        return
    theirs = _flwr_inner(labels, sizes, alpha, seed)
    assert [p.tolist() for p in ours] == [p.tolist() for p in theirs]


@pytest.mark.parametrize("n,per", [(1000, 40), (5000, 30)])
def test_dirichlet_with_even_sizes_splits_thousands_of_clients(n, per):
    labels = np.random.default_rng(0).integers(0, 10, n * per)
    cfg = _cfg(**{"num-clients": n, "seed": 3, "problem": {"name": "mlp"},
                  "partition": {"kind": "dirichlet", "alpha": 0.1, "sizes": "even"}})
    parts = problems.partition_indices(labels, cfg)
    assert [p.size for p in parts] == [per] * n
    _assert_disjoint(parts)
    assert np.concatenate(parts).size == labels.size
    # label skew: at alpha 0.1 most of a client's rows are of one or two classes
    top = [np.bincount(labels[p], minlength=10).max() / per for p in parts]
    assert np.mean(top) > 0.6
    if n == 1000:  # the larger split is the same rule, already checked once
        again = problems.partition_indices(labels, cfg)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_even_sizes_are_iid_s_equal_sizes():
    labels = np.random.default_rng(0).integers(0, 10, 1003)
    even = problems.partition_indices(
        labels, _cfg(**{"num-clients": 10, "problem": {"name": "mlp"}, "partition": {"sizes": "even"}})
    )
    equal = problems.partition_indices(labels, _cfg(**{"num-clients": 10}))
    assert [p.tolist() for p in even] == [p.tolist() for p in equal]


def test_a_failed_dirichlet_split_is_one_config_error_and_prints_no_warning(capfd):
    labels = np.random.default_rng(0).integers(0, 10, 40_000)
    cfg = _cfg(**{"num-clients": 1000, "partition": {"kind": "dirichlet", "alpha": 0.1}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError) as ei:
            problems.partition_indices(labels, cfg)
    msg = str(ei.value)
    assert "partition.alpha=0.1" in msg and "num-clients=1000" in msg and "partition.sizes='even'" in msg
    assert not [w for w in caught if "flwr_datasets" in w.filename]
    out, err = capfd.readouterr()
    assert "min_partition_size" not in out + err


# --- LibSVM data --------------------------------------------------------------------------


def test_libsvm_file_loads_and_trains(tmp_path):
    from sklearn.datasets import dump_svmlight_file

    rng = np.random.default_rng(0)
    n, d = 80, 5
    X = rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    y = np.where(X @ w_true + 0.1 * rng.normal(size=n) > 0, 1, -1)
    path = tmp_path / "toy.svm"
    dump_svmlight_file(X, y, str(path))

    cfg = _cfg(**{"num-clients": 4, "seed": 0, "problem": {"name": "logreg", "dataset": str(path)}})
    problem = problems.build_problem(cfg)
    assert problem.num_clients == 4
    assert sum(p.size for p in problem.parts) == n
    w0 = problem.init_params()
    assert w0["w"].shape == (d + 1,)  # features + bias
    g = problem.grad(w0)["w"]
    assert g.shape == (d + 1,) and np.all(np.isfinite(g)) and np.linalg.norm(g) > 0

    # and it trains: 50 rounds of GD lower the loss and raise the accuracy
    alg = algorithms.make_algorithm("gd", lr=1.0)
    x = w0
    server = server_init(alg, x)
    states = [client_init(alg, x) for _ in range(problem.num_clients)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        msgs = []
        for i in range(problem.num_clients):
            res = client_update(alg, x, states[i], lambda p, r, i=i: problem.client_grad(i, p), rng)
            states[i] = res.state
            msgs.append(res.message)
        x, server = server_update(alg, x, server, msgs, problem.num_clients)
    assert np.all(np.isfinite(x["w"]))
    assert problem.loss(x) < problem.loss(w0) - 0.1
    assert problem.accuracy(x) >= 0.85
    assert core.global_norm(problem.grad(x)) < core.global_norm(problem.grad(w0))


def test_libsvm_missing_file_is_config_error(tmp_path):
    missing = tmp_path / "none.svm"
    cfg = _cfg(**{"num-clients": 2, "problem": {"name": "logreg", "dataset": str(missing)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    assert "problem.dataset" in str(ei.value) and str(missing) in str(ei.value)


def _libsvm(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return _cfg(**{"num-clients": 2, "problem": {"name": "logreg", "dataset": str(path)}})


def test_libsvm_feature_index_beyond_the_cap_is_refused_before_densifying(tmp_path):
    path = tmp_path / "wide.svm"
    cfg = _libsvm(path, ["1 1:0.5 300000000:1.0", "-1 2:1.0", "1 1:2.0"])
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    assert "problem.dataset" in str(ei.value) and str(path) in str(ei.value) and "300000000" in str(ei.value)


def test_libsvm_too_large_for_memory_is_refused_before_densifying(tmp_path):
    path = tmp_path / "tall.svm"
    rows = 100_000
    cfg = _libsvm(path, [f"{1 if i % 2 else -1} {1 + i % 7}:1.0" for i in range(rows - 1)] + ["1 1000000:1.0"])
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    msg = str(ei.value)
    assert "problem.dataset" in msg and str(path) in msg and "100000 rows x 1000000 features" in msg
    assert "2.4 TB of data" in msg  # 3 copies of rows x (features + 1) x 8 B


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_libsvm_with_non_finite_features_is_refused(tmp_path, bad):
    path = tmp_path / "bad.svm"
    cfg = _libsvm(path, [f"1 1:{bad} 2:1.0", "-1 1:1.0 2:3.0", "1 1:2.0"])
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    assert "problem.dataset" in str(ei.value) and str(path) in str(ei.value) and "finite" in str(ei.value)


# --- centres files: real numbers, one array, n x d with d >= 1 --------------------------------


BAD_CENTERS = {
    "strings": np.array([["a"], ["b"], ["c"]]),
    "structured": np.zeros((3, 2), dtype=[("a", "f8"), ("b", "i4")]),
    "complex": np.ones((3, 2), dtype=complex),
    "datetimes": np.array([["2020-01-01"]] * 3, dtype="datetime64[D]"),
    "bools": np.ones((3, 2), dtype=bool),
}


@pytest.mark.parametrize("kind", list(BAD_CENTERS))
def test_centers_file_of_no_real_numbers_is_refused(tmp_path, kind):
    path = tmp_path / f"{kind}.npy"
    np.save(path, BAD_CENTERS[kind])
    cfg = _cfg(**{"num-clients": 3, "problem": {"centers": str(path)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    msg = str(ei.value)
    assert "problem.centers" in msg and str(path) in msg and str(BAD_CENTERS[kind].dtype) in msg


def test_npz_saved_under_a_npy_name_is_refused(tmp_path):
    path = tmp_path / "c.npy"
    with path.open("wb") as f:
        np.savez(f, centers=np.zeros((3, 2)))
    cfg = _cfg(**{"num-clients": 3, "problem": {"centers": str(path)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    assert "problem.centers" in str(ei.value) and str(path) in str(ei.value) and ".npz" in str(ei.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8, np.uint16, np.int64])
def test_centers_file_of_ints_or_floats_becomes_float64(tmp_path, dtype):
    path = tmp_path / "c.npy"
    np.save(path, np.array([[1], [1], [10]], dtype=dtype))
    problem = problems.build_problem(_cfg(**{"num-clients": 3, "problem": {"centers": str(path)}}))
    assert problem.centers.dtype == np.float64
    np.testing.assert_array_equal(problem.centers, [[1.0], [1.0], [10.0]])


def test_centers_file_beyond_float64_is_refused(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.full((3, 1), 1e4000, dtype=np.longdouble))
    cfg = _cfg(**{"num-clients": 3, "problem": {"centers": str(path)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    assert "problem.centers" in str(ei.value) and "finite" in str(ei.value)


def test_centers_without_columns_are_refused(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.zeros((3, 0)))
    for centers in (str(path), [[], [], []]):
        cfg = _cfg(**{"num-clients": 3, "problem": {"centers": centers}})
        with pytest.raises(ConfigError) as ei:
            problems.build_problem(cfg)
        assert "problem.centers" in str(ei.value) and "at least one column" in str(ei.value)
    with pytest.raises(ConfigError):
        problems.build_problem(_cfg(**{"num-clients": 1, "problem": {"centers": [[]]}}))


@pytest.mark.parametrize("centers", [[[True], [False], [True]], [["1"], ["2"], ["3"]], [1.0, 2.0, 3.0], [[10**400]] * 3])
def test_inline_centers_must_be_rows_of_finite_numbers(centers):
    cfg = _cfg(**{"num-clients": 3, "problem": {"centers": centers}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    assert "problem.centers" in str(ei.value)


def test_centers_file_too_large_for_memory_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.npy"
    # A sparse file: its header says 10,000 x 10,000,000 (800 GB); no data block is written.
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(10**4, 10**7)).flush()
    cfg = _cfg(**{"num-clients": 10**4, "problem": {"centers": str(path)}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    msg = str(ei.value)
    assert "problem.centers" in msg and str(path) in msg and "10000 x 10000000" in msg and "TB" in msg


# --- sizes: checked before anything is allocated ------------------------------------------------


SIZES = [
    ({"num-clients": 10**4, "problem": {"dim": 10**8}}, ["problem.dim=100000000", "num-clients=10000"]),
    (
        {"num-clients": 10, "problem": {"name": "logreg", "dataset": "synthetic", "rows": 10**7, "features": 10**6}},
        ["problem.rows=10000000", "problem.features=1000000"],
    ),
    ({"num-clients": 10**5, "problem": {"name": "mlp", "dataset": "digits", "hidden": 10**6}}, ["problem.hidden=1000000"]),
]


@pytest.mark.parametrize("scenario,named", SIZES, ids=["dim", "rows-features", "hidden"])
def test_a_problem_too_large_for_memory_is_refused_naming_keys_values_and_estimate(scenario, named):
    cfg = _cfg(**scenario)
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    msg = str(ei.value)
    for item in named:
        assert item in msg, msg
    assert "needs about" in msg and "available" in msg and ("TB" in msg)


def test_the_memory_estimate_counts_data_and_every_clients_state():
    cfg = _cfg(**{"num-clients": 1000, "problem": {"dim": 10**8}})
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    # 0.8 TB of centres (1000 x 1e8 x 8 B) and 2 x 1000 x 1e8 x 8 B of messages and memories
    assert "needs about 2.4 TB" in str(ei.value) and "800 GB of data, 1.6 TB" in str(ei.value)


# --- plug-in problems: code, checked at every step ----------------------------------------------

PLUGIN_SOURCE = '''
import numpy as np
from fl_clip21.problems import MeanEstimation

def good(cfg):
    return MeanEstimation(np.zeros((cfg["num-clients"], 2)))

def raises(cfg):
    raise RuntimeError("boom")

def half(cfg):
    class Half:
        num_clients = cfg["num-clients"]
        def loss(self, params):
            return 0.0
    return Half()

def odd_count(cfg):
    problem = good(cfg)
    problem.num_clients = "3"
    return problem

not_callable = 3
'''


@pytest.fixture()
def plugins(tmp_path, monkeypatch):
    (tmp_path / "fl21_plugins_under_test.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "fl21_broken_plugin.py").write_text("raise ImportError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fl21_plugins_under_test"


def _plugin_cfg(name: str, n: int = 3) -> dict:
    return _cfg(**{"num-clients": n, "problem": {"name": name}})


def test_a_plugin_problem_builds(plugins):
    problem = problems.build_problem(_plugin_cfg(f"{plugins}:good"))
    assert problem.num_clients == 3 and problem.init_params()["x"].shape == (2,)


PLUGIN_ERRORS = [
    ("os:system", "TypeError"),
    ("builtins:print", "lacks num_clients, classification, init_params, client_grad, loss, grad, accuracy"),
    ("sys:exit", "SystemExit"),
    ("{m}:raises", "RuntimeError: boom"),
    ("{m}:half", "lacks classification, init_params, client_grad, grad, accuracy"),
    ("{m}:odd_count", "num_clients must be an integer"),
    ("{m}:not_callable", "must be callable"),
    ("{m}:missing", "has no attribute 'missing'"),
    ("fl21_broken_plugin:make", "ImportError: no GPU here"),
    ("fl21_no_such_module:make", "could not be imported"),
]


@pytest.mark.parametrize("name,why", PLUGIN_ERRORS, ids=[n for n, _ in PLUGIN_ERRORS])
def test_a_bad_plugin_is_a_config_error_naming_problem_name(plugins, name, why):
    name = name.format(m=plugins)
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(_plugin_cfg(name))
    msg = str(ei.value)
    assert "problem.name" in msg and repr(name) in msg and why in msg, msg


def test_a_malformed_plugin_name_sent_to_a_node_is_a_config_error():
    cfg = {**_cfg(), "problem.name": ":"}  # not resolved: as a node receives it
    with pytest.raises(ConfigError) as ei:
        problems.build_problem(cfg)
    assert "problem.name" in str(ei.value) and "':'" in str(ei.value)
