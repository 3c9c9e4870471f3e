"""Federated problems: client objectives f_i, the global f = (1/n) sum_i f_i.

Built in: ``mean-estimation``, ``logreg`` (non-convex regulariser, breast_cancer,
scikit-learn's synthetic ``make_classification`` data or a LibSVM file), ``mlp`` (a small torch
classifier on digits or MNIST-1D) and ``cnn1d`` (a small 1-D CNN, same data); the last three
also take a dataset table (:mod:`fl_clip21.datasets`). A plug-in
problem is named ``module:factory``; ``factory(cfg)`` gets the resolved
scenario dict and returns an object with the :class:`Problem` methods.

Everything here is deterministic in the scenario (seed included), so the
server and every client build the same problem independently. Sizes are
checked before anything is allocated (:func:`check_memory`), data files before
their data is read, and a plug-in's import, factory and result before it is used.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fl_clip21 import backend, kernels, streams
from fl_clip21.config import MAX_DIM, MAX_FEATURES, MAX_ROWS, ConfigError, plugin_parts
from fl_clip21.core import Params
from fl_clip21.layout import Layout


@dataclass(frozen=True)
class Minibatch:
    """Which minibatch a client draws: ``size`` rows of its own, from the stream of (seed, round, step).

    ``step`` numbers the draws within one round (CELGC's local steps). A
    client with at most ``size`` rows uses all of them (its exact gradient).
    """

    seed: int
    round: int
    size: int
    step: int = 0


@dataclass(frozen=True)
class Evaluation:
    """The global objective at a model: f = (1/n) sum_i f_i, its gradient, accuracy.

    ``client_grads`` holds every client's full gradient at that model, (n, d),
    when computing f's gradient produced them anyway (the engine reuses them as
    the next round's gradients of full-batch algorithms); otherwise None.
    """

    loss: float
    grad: np.ndarray
    accuracy: float | None
    client_grads: np.ndarray | None = None


class Problem(Protocol):
    """What an engine needs from a problem: batches of clients on flat models.

    A model is a flat (d,) vector in :attr:`layout`'s order (fl_clip21.layout);
    a batch of m clients' points is an (m, d) array, or one (d,) vector that
    every client of the batch evaluates at. Client indices are numpy arrays; the
    points and what the methods return live on the problem's backend (numpy,
    or torch on a device: :func:`on_backend`).
    """

    num_clients: int
    classification: bool
    layout: Layout

    def init_params(self) -> Params: ...

    def grads(
        self, points: np.ndarray, clients: np.ndarray, minibatch: Minibatch | None = None,
        point_of_row: np.ndarray | None = None,
    ) -> np.ndarray:
        """(m, d): the gradient of f_{clients[j]} at ``points`` (row j, or the one vector), on a minibatch if given.

        With ``point_of_row``, ``points`` holds P distinct models (P, d) and row j
        is at ``points[point_of_row[j]]`` (the cells of a batched sweep).
        """

    def evaluate(self, x: np.ndarray, client_grads: bool = False) -> Evaluation:
        """f, its gradient and accuracy at ``x``; with ``client_grads`` also every client's full gradient."""

    def evaluate_many(self, xs: np.ndarray, client_grads: bool = False) -> list[Evaluation]:
        """:meth:`evaluate` of each of the (C, d) models ``xs``."""


class DictAPI:
    """The array-dict view of a :class:`Problem` (for tests, examples and the Flower baseline).

    Plug-in problems implement this view (``client_grad(i, params, rng,
    batch_size)``, ``loss``, ``grad``, ``accuracy``) and are wrapped in
    :class:`PluginProblem`; the built-in ones derive it from their batched methods.
    """

    layout: Layout

    def evaluate_many(self, xs: np.ndarray, client_grads: bool = False) -> list[Evaluation]:
        return [self.evaluate(x, client_grads) for x in xs]

    def client_grad(self, i: int, params: Params, minibatch: Minibatch | None = None) -> Params:
        return self.layout.unflatten(self.grads(self.layout.flatten(params), np.array([i]), minibatch)[0])

    def loss(self, params: Params) -> float:
        return self.evaluate(self.layout.flatten(params)).loss

    def grad(self, params: Params) -> Params:
        return self.layout.unflatten(self.evaluate(self.layout.flatten(params)).grad)

    def accuracy(self, params: Params) -> float | None:
        return self.evaluate(self.layout.flatten(params)).accuracy


def _rows_of(points: np.ndarray, point_of_row: np.ndarray | None) -> np.ndarray:
    """One point per row: ``points[point_of_row]``, or ``points`` as given."""
    return points if point_of_row is None else points[backend.of(points).asarray(point_of_row)]


def _segment_starts(sizes: np.ndarray) -> np.ndarray:
    """Offsets of consecutive segments of ``sizes`` rows (for ``np.add.reduceat``)."""
    return np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)


# --- data partitioning with flwr-datasets ----------------------------------


def partition_indices(labels: np.ndarray, cfg: dict[str, Any]) -> list[np.ndarray]:
    """Split row indices among ``num-clients`` clients with a flwr-datasets partitioner (or its rule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pyarrow's, inside datasets
        # DirichletPartitioner warns before each retry, with alpha listed once per class:
        # the ConfigError of a failed split says what the user needs.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"flwr_datasets\.")
        return _partition_indices(labels, cfg)


def client_sizes(cfg: dict[str, Any], num_rows: int) -> list[int] | None:
    """Rows per client that ``partition.sizes`` asks for (None: "equal", the partition's own).

    "even": ``num_rows // n`` each, one more for the first ``num_rows % n``
    clients (IidPartitioner's sizes). flwr-datasets' Linear/Square/ExponentialPartitioner
    rule: client i gets a share of ``num_rows`` proportional to i+1, (i+1)^2 or
    e^(i+1), the remainder to the last.
    """
    from flwr_datasets.partitioner import ExponentialPartitioner, LinearPartitioner, SquarePartitioner

    n, sizes = cfg["num-clients"], cfg.get("partition.sizes", "equal")
    if sizes == "equal":
        return None
    if sizes == "even":
        return [num_rows // n + (i < num_rows % n) for i in range(n)]
    cls = {"linear": LinearPartitioner, "square": SquarePartitioner, "exponential": ExponentialPartitioner}[sizes]
    part = cls(num_partitions=n)
    part.dataset = _datasets_rows(np.zeros(num_rows, dtype=np.int64))
    try:
        part.num_partitions  # noqa: B018 - computes the sizes; raises if one is 0
    except ValueError:
        pass
    counts = [int(part.partition_id_to_size[i]) for i in range(n)]
    if min(counts) < 1:
        raise ConfigError(
            f"partition.sizes={sizes!r} leaves client 0 with {min(counts)} of the {num_rows} data rows "
            f"for num-clients={n}; every client needs at least one row: use fewer clients or slower-growing sizes"
        )
    return counts


def _datasets_rows(labels: np.ndarray):
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict({"label": labels.tolist(), "row": np.arange(len(labels)).tolist()})


def inner_dirichlet(labels: np.ndarray, sizes: list[int], alpha: float, seed: int) -> list[np.ndarray]:
    """flwr-datasets' ``InnerDirichletPartitioner`` split of ``labels``' positions, in O(rows): the same positions.

    Client i's class mix p_i ~ Dirichlet(alpha) (a seeded Generator), then row
    by row: a client that still needs rows is drawn uniformly, a class from
    its p_i (renormalised over the classes with rows left), and that class's
    last unassigned row goes to it. Identical draws to flwr-datasets 0.6's
    (tests compare the two); its loop sums every client's count and turns the
    list of clients into an array per row, O(rows x n): about 60 s for 5000
    clients x 30 rows, 0.4 s here.

    Raises
    ------
    ConfigError
        When a client's p_i has no mass left on the classes with rows (alpha
        so small that its other entries are 0 in floating point).
    """
    rng = np.random.default_rng(seed)
    _, codes = np.unique(labels, return_inverse=True)
    classes = int(codes.max()) + 1
    priors = rng.dirichlet(np.full(classes, float(alpha)), size=len(sizes))
    cdfs = _cdfs(priors)
    pools = [np.flatnonzero(codes == k) for k in range(classes)]
    rows_left = [p.size for p in pools]
    needs = list(sizes)
    out = [np.zeros(m, dtype=np.int64) for m in sizes]
    open_clients = list(range(len(sizes)))
    remaining = sum(sizes)
    while remaining:
        c = open_clients[rng.integers(0, len(open_clients))]
        if needs[c] == 0:  # drawn once more when full, as flwr-datasets does: then dropped
            open_clients.remove(c)
            continue
        needs[c] -= 1
        remaining -= 1
        while True:
            if not np.isfinite(cdfs[c, -1]):
                raise ConfigError(
                    f"partition.alpha={alpha!r} drew a client whose class mix is 0 on every class with rows left "
                    f"({len(sizes)} clients of {len(labels)} rows); use a larger alpha"
                )
            k = int(cdfs[c].searchsorted(rng.random(), side="right"))
            if rows_left[k] == 0:
                priors[:, k] = 0
                with np.errstate(invalid="ignore", divide="ignore"):
                    priors = priors / priors.sum(axis=1, keepdims=True)
                cdfs = _cdfs(priors)
                continue
            rows_left[k] -= 1
            out[c][needs[c]] = pools[k][rows_left[k]]
            break
    return out


def _cdfs(priors: np.ndarray) -> np.ndarray:
    """Each row's cumulative sums divided by their last (numpy's ``Generator.choice(p=...)`` arithmetic)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        cdfs = priors.cumsum(axis=1)
        return cdfs / cdfs[:, -1:]


def _partition_indices(labels: np.ndarray, cfg: dict[str, Any]) -> list[np.ndarray]:
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        SizePartitioner,
    )

    n, seed, kind = cfg["num-clients"], cfg["seed"], cfg["partition.kind"]
    if kind == "natural-id":  # fl_clip21.datasets gives a table's clients their rows
        raise ConfigError(
            "partition.kind 'natural-id' needs a dataset table with partition.id-column (parquet, CSV, a "
            f"dataset folder or a Hub dataset), got problem.dataset={cfg['problem.dataset']!r}"
        )
    if n > len(labels):
        raise ConfigError(f"num-clients must be <= the {len(labels)} data rows, got {n}")
    counts = client_sizes(cfg, len(labels))
    ds = _datasets_rows(labels).shuffle(seed=seed)
    if kind in ("iid", "label-sorted"):
        if kind == "label-sorted":
            # Contiguous blocks of the label-sorted rows: every row goes to a client
            # (ShardPartitioner's equal shards would drop the remainder).
            ds = ds.sort(["label", "row"])
        part = IidPartitioner(num_partitions=n) if counts is None else SizePartitioner(counts)
    elif kind == "dirichlet" and counts is None:
        part = DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=cfg["partition.alpha"],
            min_partition_size=1, seed=seed,
        )
    elif kind == "dirichlet":
        # Each client's class mix from Dirichlet(alpha), its size from partition.sizes.
        order = ds.with_format("arrow")[:]["row"].to_numpy().astype(np.int64)  # a column at once, not row by row
        positions = inner_dirichlet(labels[order], counts, cfg["partition.alpha"], seed)
        return [np.sort(order[p]) for p in positions]
    else:
        k = cfg["partition.classes-per-client"]
        num_classes = len(np.unique(labels))
        if k > num_classes:
            raise ConfigError(f"partition.classes-per-client must be <= {num_classes} classes, got {k}")
        part = PathologicalPartitioner(
            num_partitions=n, partition_by="label", num_classes_per_partition=k,
            class_assignment_mode="deterministic", seed=seed,
        )
    part.dataset = ds
    out = []
    for i in range(n):
        try:
            rows = np.asarray(part.load_partition(i)["row"], dtype=np.int64)
        except ValueError as e:
            raise ConfigError(
                f"partition.alpha={cfg['partition.alpha']!r} gives no split of {len(labels)} rows that leaves "
                f"each of num-clients={n} clients data (flwr-datasets: {e}); use a larger alpha, fewer clients, "
                "or partition.sizes='even' (equal sizes, each client's class mix from Dirichlet(alpha))"
            ) from None
        if rows.size == 0:
            raise ConfigError(
                f"partition.kind {kind!r} left client {i} without data for num-clients={n}; "
                "use fewer clients or another partition"
            )
        out.append(np.sort(rows))
    return out


# --- sizes, checked before anything is allocated -----------------------------

# Arrays of d float64 values per client that a run holds at once: the round's message
# (the server gathers every reply) and the client's memory v_i.
CLIENT_ARRAYS = 2


def _size(nbytes: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB", "PB")
    power = 0
    while nbytes >= 1000 and power < len(units) - 1:
        nbytes, power = nbytes / 1000, power + 1
    return f"{nbytes:.3g} {units[power]}"


def check_memory(what: str, cfg: dict[str, Any], data_bytes: int, d: int) -> None:
    """Raise :class:`ConfigError` if a problem's data and its clients' state would not fit in memory.

    Parameters
    ----------
    what:
        The keys and values that set the size (``"problem.dim=100000"``), for the message.
    cfg:
        The scenario (its ``num-clients``).
    data_bytes:
        The bytes the problem's data takes while it is built.
    d:
        The model's number of entries.
    """
    import psutil

    n = cfg["num-clients"]
    clients = CLIENT_ARRAYS * n * d * 8
    need = data_bytes + clients
    available = psutil.virtual_memory().available
    if need > available:
        raise ConfigError(
            f"{what} with num-clients={n} needs about {_size(need)} of memory ({_size(data_bytes)} of data, "
            f"{_size(clients)} for {CLIENT_ARRAYS} x num-clients x d x 8 B of messages and client memories, "
            f"d = {d}), more than the {_size(available)} available"
        )


# --- mean estimation -------------------------------------------------------


class MeanEstimation(DictAPI):
    """f_i(x) = 0.5 * ||x - a_i||^2; the minimiser of f is the mean of the a_i."""

    classification = False
    xp: backend.Backend = backend.NUMPY

    def __init__(self, centers: np.ndarray):
        self.centers = np.asarray(centers, dtype=np.float64)
        self.num_clients = self.centers.shape[0]
        self.layout = Layout.of(self.init_params())

    def on(self, xp: backend.Backend) -> MeanEstimation:
        """This problem computing on the backend ``xp`` (the centres copied there)."""
        out = copy.copy(self)
        out.xp, out.centers = xp, xp.asarray(self.centers)
        return out

    def init_params(self) -> Params:
        return {"x": np.zeros(self.centers.shape[1])}

    def grads(self, points, clients, minibatch=None, point_of_row=None) -> np.ndarray:
        return _rows_of(points, point_of_row) - self.centers[self.xp.asarray(clients, dtype=np.int64)]

    def evaluate(self, x, client_grads: bool = False) -> Evaluation:
        diff = x - self.centers
        loss = 0.5 * self.xp.mean(self.xp.einsum("ij,ij->i", diff, diff))
        return Evaluation(loss, diff.mean(axis=0), None, diff)


def _load_centers(cfg: dict[str, Any]) -> np.ndarray:
    src = cfg["problem.centers"]
    n = cfg["num-clients"]
    if src is None:
        d = cfg["problem.dim"]
        check_memory(f"problem.dim={d}", cfg, n * d * 8, d)
        rng = np.random.default_rng(cfg["seed"])
        return rng.normal(0.0, cfg["problem.spread"], size=(n, d))
    if isinstance(src, list):
        if not all(isinstance(row, list) for row in src) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for row in src for x in row
        ):
            raise ConfigError(
                f"problem.centers must be a list of rows of numbers (not bools or strings), got {src!r}"
            )
        try:
            arr = np.asarray(src, dtype=np.float64)
        except (ValueError, OverflowError):
            raise ConfigError(
                f"problem.centers must be a list of equal-length rows of finite numbers, got {src!r}"
            ) from None
        _check_centers_shape(arr.shape, src, n)
    else:
        arr = _read_centers(cfg, src)
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"problem.centers must be finite, got non-finite values in {src!r}")
    return arr


def _check_centers_shape(shape: tuple[int, ...], src: Any, n: int) -> None:
    if len(shape) != 2:
        raise ConfigError(f"problem.centers must be 2-D (n x d), got shape {shape} from {src!r}")
    if shape[1] < 1:
        raise ConfigError(f"problem.centers must have at least one column (d >= 1), got shape {shape} from {src!r}")
    if shape[1] > MAX_DIM:
        raise ConfigError(f"problem.centers must have at most {MAX_DIM} columns (d), got shape {shape} from {src!r}")
    if shape[0] != n:
        raise ConfigError(f"num-clients must equal the {shape[0]} rows of problem.centers, got {n}")


def _read_centers(cfg: dict[str, Any], src: str) -> np.ndarray:
    """The centres of a .npy file of real numbers, checked from its header before its data is read."""
    path = Path(src)
    if not path.is_file():
        raise ConfigError(f"problem.centers file not found: {src!r}")
    try:
        # Memory-mapped: only the header is read until the checks below pass.
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds here
        raise ConfigError(f"problem.centers could not be read as .npy ({e}): {src!r}") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise ConfigError(
            f"problem.centers must be one array saved with numpy.save (.npy), got a .npz archive: {src!r}"
        )
    if arr.dtype.kind not in "iuf":
        raise ConfigError(
            f"problem.centers must hold real numbers (integers or floats), got dtype {arr.dtype} in {src!r}"
        )
    _check_centers_shape(arr.shape, src, cfg["num-clients"])
    rows, d = arr.shape
    check_memory(f"problem.centers={src!r} ({rows} x {d})", cfg, rows * d * (8 + arr.dtype.itemsize), d)
    with np.errstate(over="ignore"):  # a long double beyond float64's range becomes inf, refused next
        return np.array(arr, dtype=np.float64)


# --- logistic regression with a non-convex regulariser ----------------------


def load_libsvm(path: str, cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Read a LibSVM file with scikit-learn: dense finite features, labels as given.

    Its size is checked (:func:`check_memory`, the caps of ``problem.rows`` and
    ``problem.features``) on the sparse matrix, before it is made dense.
    """
    from sklearn.datasets import load_svmlight_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"problem.dataset file not found: {path!r}")
    try:
        X, y = load_svmlight_file(str(p))
    except ValueError as e:
        raise ConfigError(f"problem.dataset is not a LibSVM file ({e}): {path!r}") from None
    rows, cols = X.shape
    if rows > MAX_ROWS or cols > MAX_FEATURES:
        raise ConfigError(
            f"problem.dataset must have at most {MAX_ROWS} rows and {MAX_FEATURES} features, "
            f"got {rows} rows x {cols} features (largest feature index) in {path!r}"
        )
    check_memory(
        f"problem.dataset={path!r} ({rows} rows x {cols} features)", cfg,
        LOGREG_COPIES * rows * (cols + 1) * 8, cols + 1,
    )
    bad = int(np.count_nonzero(~np.isfinite(X.data)) + np.count_nonzero(~np.isfinite(y)))
    if bad:
        raise ConfigError(f"problem.dataset must hold finite numbers, got {bad} nan or inf values in {path!r}")
    return X.toarray(), np.asarray(y)


# Copies of the (rows x d) design matrix LogReg holds while it is built: the raw data,
# the standardised one with its bias column, and the clients' rows stacked in order.
LOGREG_COPIES = 3


class _ClientData(DictAPI):
    """Per-client (X_i, y_i) built by a partitioner over the whole data, stored client after client.

    ``X`` and ``y`` hold client 0's rows, then client 1's, ...: ``parts[i]`` is
    the contiguous range of client i's rows, so a batch of clients' rows is
    read in place (no copy of the data per round). ``order[r]`` is the row of
    the data as loaded that stored row r is.
    """

    def __init__(
        self, X: np.ndarray, y: np.ndarray, cfg: dict[str, Any], parts: list[np.ndarray] | None = None,
        spare_rows: int = 0,
    ):
        parts = partition_indices(y, cfg) if parts is None else parts
        self.order = np.concatenate(parts)
        # ``_Xr``: the stored rows and ``spare_rows`` more after them (scratch rows a subclass
        # computes with, next to the data); ``X`` is the stored rows, a view.
        self._Xr = np.empty((self.order.size + spare_rows, *X.shape[1:]), dtype=X.dtype)
        self.X = np.take(X, self.order, axis=0, out=self._Xr[: self.order.size])
        self.y = y[self.order]
        self.sizes = np.array([p.size for p in parts], dtype=np.int64)
        self.starts = _segment_starts(self.sizes)
        self.parts = [np.arange(a, a + m) for a, m in zip(self.starts, self.sizes)]
        self.num_clients = len(parts)

    def rows(self, clients: np.ndarray, minibatch: Minibatch | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows a batch of clients computes on: ``(rows, owner, weight)``, flat and grouped by client.

        ``owner[r]`` is the position in ``clients`` of the client row ``rows[r]``
        belongs to, ``weight[r]`` is 1 / (that client's number of rows used).
        A minibatch of b rows is the b smallest of the client's stream of
        uniforms (sorted), so it is the same whatever else is computed with it.
        """
        clients = np.asarray(clients, dtype=np.int64)
        sizes = self.sizes[clients]
        b = minibatch.size if minibatch is not None else None
        counts = sizes if b is None else np.minimum(sizes, b)
        owner = np.repeat(np.arange(clients.size), counts)
        offsets = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = offsets
        drawn = np.flatnonzero(sizes > b) if b is not None else np.zeros(0, dtype=np.int64)
        if drawn.size:
            keys = streams.uniforms(
                minibatch.seed, streams.BATCH, clients[drawn], minibatch.round, int(sizes[drawn].max()), minibatch.step
            )
            keys[np.arange(keys.shape[1])[None, :] >= sizes[drawn][:, None]] = np.inf
            picked = np.sort(np.argpartition(keys, b - 1, axis=1)[:, :b], axis=1)
            positions = positions.copy()
            where = np.isin(owner, drawn)
            positions[where] = picked.ravel()
        rows = self.starts[clients][owner] + positions
        return rows, owner, 1.0 / counts[owner]


class LogReg(_ClientData):
    """f_i(x) = mean log(1 + exp(-y a^T x)) + reg * sum_j x_j^2 / (1 + x_j^2)."""

    classification = True

    def __init__(self, cfg: dict[str, Any]):
        from fl_clip21.datasets import is_table, load_table

        src, parts = cfg["problem.dataset"], None
        if src == "breast_cancer":
            from sklearn.datasets import load_breast_cancer

            X, y = load_breast_cancer(return_X_y=True)
        elif src == "synthetic":
            from sklearn.datasets import make_classification

            f, rows = cfg["problem.features"], cfg["problem.rows"]
            check_memory(
                f"problem.rows={rows}, problem.features={f}", cfg, LOGREG_COPIES * rows * (f + 1) * 8, f + 1
            )
            X, y = make_classification(
                n_samples=rows, n_features=f, n_informative=max(1, f // 2),
                n_redundant=0, n_clusters_per_class=1, random_state=cfg["seed"],
            )
        elif src in ("digits", "mnist1d"):
            raise ConfigError(
                f"problem.dataset {src!r} has 10 classes and logreg takes 2 (breast_cancer, synthetic, a LibSVM "
                "file or a 2-class table); its 10 classes train with problem.name mlp or cnn1d"
            )
        elif is_table(src):
            table = load_table(cfg, lambda rows, f, k: (LOGREG_COPIES * rows * (f + 1) * 8, f + 1), binary=True)
            X, y, parts = table.X, table.y, table.parts
        else:
            X, y = load_libsvm(src, cfg)
        classes = np.unique(y)
        if classes.size != 2:
            raise ConfigError(f"problem.dataset must have 2 classes for logreg, got {classes.size} in {src!r}")
        X = (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
        X = np.hstack([X, np.ones((X.shape[0], 1))])
        labels = (y == classes[1]).astype(np.int64)
        super().__init__(X, labels, cfg, parts, spare_rows=1)
        self.signs = 2.0 * self.y - 1.0
        self.reg = cfg["problem.reg"]
        self.layout = Layout.of(self.init_params())
        # 1 / |P_i| of each row's client, for f's gradient (every client weighs the same).
        self._row_weight = np.repeat(1.0 / self.sizes, self.sizes)
        # Every client's gradient in one CSR product over the data and a last row holding the
        # regulariser's gradient (weight 1, after the client's rows: the same sums, in the same
        # order, as adding it afterwards, without a pass over the (n, d) result).
        N, n = self.X.shape[0], self.num_clients
        owner = np.repeat(np.arange(n), self.sizes)
        self._data_slots = np.arange(N) + owner
        self._reg_slots = self.starts + self.sizes + np.arange(n)
        indices = np.empty(N + n, dtype=np.int64)
        indices[self._data_slots], indices[self._reg_slots] = np.arange(N), N
        self._client_sums = backend.NUMPY.row_sums(indices, self.sizes + 1, N + 1)
        self._slots_lock = threading.Lock()  # the spare row is written by every evaluation
        self._nonempty = bool(np.all(self.sizes > 0))

    xp: backend.Backend = backend.NUMPY

    def on(self, xp: backend.Backend) -> LogReg:
        """This problem computing on the backend ``xp``: the data and its signs and weights copied there.

        The partition (``sizes``, ``starts``) stays on the host, where the
        rows of a batch are chosen.
        """
        out = copy.copy(self)
        out.xp = xp
        out._Xr, out.signs, out._row_weight = (xp.asarray(a) for a in (self._Xr, self.signs, self._row_weight))
        out.X = out._Xr[: self.X.shape[0]]
        out._data_slots, out._reg_slots = xp.asarray(self._data_slots), xp.asarray(self._reg_slots)
        indices = np.empty(len(self._data_slots) + self.num_clients, dtype=np.int64)
        indices[self._data_slots], indices[self._reg_slots] = np.arange(self.X.shape[0]), self.X.shape[0]
        out._client_sums = xp.row_sums(indices, self.sizes + 1, self.X.shape[0] + 1)
        out._slots_lock = threading.Lock()
        return out

    def init_params(self) -> Params:
        return {"w": np.zeros(self.X.shape[1])}

    def _compiled(self, x: np.ndarray) -> bool:
        """Whether the compiled pass (fl_clip21.kernels.logreg_evaluate) takes the model ``x``: one float64 model
        on numpy, numba on, every client with rows."""
        return x.ndim == 1 and x.dtype == np.float64 and self._nonempty and kernels.usable(self.X, x[None, :])

    def _reg_grad(self, w: np.ndarray) -> np.ndarray:
        return self.reg * 2 * w / (1 + w**2) ** 2

    def grads(self, points, clients, minibatch=None, point_of_row=None) -> np.ndarray:
        """Every listed client's (minibatch) gradient: its rows' margins, then one sparse-times-dense product."""
        xp = self.xp
        clients = np.asarray(clients, dtype=np.int64)
        full = minibatch is None or (clients.size > 0 and minibatch.size >= self.sizes[clients].max())
        if full and point_of_row is None and clients.size > 0 and self._compiled(points):
            # Full gradients at one model (a minibatch of at least every row is every row, in order): the
            # evaluation's compiled pass over these clients' rows, bit for bit what the evaluation computes.
            return kernels.logreg_evaluate(
                self.X, self.signs, points, self._reg_grad(points), self.starts[clients], self.sizes[clients], True
            )[3]
        rows, owner, weight = self.rows(clients, minibatch)
        counts = np.bincount(owner, minlength=clients.size)
        rows, owner, weight = xp.asarray(rows), xp.asarray(owner), xp.asarray(weight)
        if point_of_row is not None:  # few distinct models: one product with all of them, then a gather
            point_of_row = xp.asarray(point_of_row)
            z = (self.X @ points.T)[rows, point_of_row[owner]]
            points = points[point_of_row]
        elif points.ndim == 1:
            z = self.X @ points if rows.shape[0] > self.X.shape[0] // 4 else None
            z = z[rows] if z is not None else self.X[rows] @ points
        else:
            z = xp.einsum("ij,ij->i", self.X[rows], points[owner])
        return self._grads_at(points, rows, counts, weight, z)

    def _grads_at(self, points, rows, counts, weight, z) -> np.ndarray:
        """The gradients from the rows' margins ``z``: one CSR product over X, plus the regulariser's.

        ``counts[j]``: how many of ``rows`` (consecutive) are the j-th client's.
        """
        signs = self.signs[rows]
        s = -signs * self._sigmoid(-signs * z) * weight
        out = self.xp.weighted_row_sums(self.X, s, rows, counts)
        out += self._reg_grad(points)
        return out

    def evaluate(self, x, client_grads: bool = False) -> Evaluation:
        """f, its gradient and accuracy from one product with X (two with ``client_grads``: every client's, kept).

        Where numba is installed (fl_clip21.kernels), one compiled pass over X
        computes them all, each row's margin summed in another order than BLAS's.
        """
        xp = self.xp
        reg = self.reg * (x**2 / (1 + x**2)).sum()
        if self._compiled(x):
            data, correct, total, per_client = kernels.logreg_evaluate(
                self.X, self.signs, x, self._reg_grad(x), self.starts, self.sizes, client_grads
            )
            return Evaluation(float(data + reg), total / self.num_clients, correct / self.X.shape[0], per_client)
        z = self.X @ x
        margin = self.signs * z
        losses, sigmoids = xp.logistic(margin)
        data = xp.segment_means(losses, self.starts, self.sizes)
        s = -self.signs * sigmoids * self._row_weight
        accuracy = float(xp.fraction((z > 0) == (self.signs > 0)))
        loss = float(xp.mean(data) + reg)
        if not client_grads:
            return Evaluation(loss, self.X.T @ s / self.num_clients + self._reg_grad(x), accuracy)
        weights = xp.zeros(len(self._data_slots) + self.num_clients, dtype=s.dtype)
        weights[self._data_slots], weights[self._reg_slots] = s, 1.0
        with self._slots_lock:
            self._Xr[-1] = self._reg_grad(x)
            per_client, total = self._client_sums(weights, self._Xr, with_total=True)
        return Evaluation(loss, total / self.num_clients, accuracy, per_client)

    def evaluate_many(self, xs: np.ndarray, client_grads: bool = False) -> list[Evaluation]:
        """:meth:`evaluate` of C models from one (N, C) product with X.

        With ``client_grads`` every client's gradient at every model too, in
        one (C n, d) array, cell after cell (f's gradient is their mean).
        """
        xp = self.xp
        Z = self.X @ xs.T
        margin = self.signs[:, None] * Z
        reg = self.reg * (xs**2 / (1 + xs**2)).sum(axis=1)
        losses, sigmoids = xp.logistic(margin)
        data = xp.segment_means(losses, self.starts, self.sizes).mean(axis=0)
        s = -self.signs[:, None] * sigmoids * self._row_weight[:, None]
        accuracy = xp.fraction((Z > 0) == (self.signs[:, None] > 0), axis=0)
        C, N = len(xs), self.X.shape[0]
        if not client_grads:
            grads = (self.X.T @ s).T / self.num_clients + self._reg_grad(xs)
            return [Evaluation(float(data[c] + reg[c]), grads[c], float(accuracy[c])) for c in range(C)]
        per_client = xp.weighted_row_sums(
            self.X, s.T.reshape(-1), xp.asarray(np.tile(np.arange(N), C)), np.tile(self.sizes, C)
        )
        blocks = per_client.reshape(C, self.num_clients, -1)
        blocks += self._reg_grad(xs)[:, None, :]
        grads = blocks.mean(axis=1)
        return [Evaluation(float(data[c] + reg[c]), grads[c], float(accuracy[c]), blocks[c]) for c in range(C)]

    def _sigmoid(self, z: np.ndarray) -> np.ndarray:
        return self.xp.logistic(-z)[1]


# --- a small torch MLP on digits or a dataset table ---------------------------


_DIGITS_ROWS = 1797  # scikit-learn's digits


def _mlp_size(hidden: int, inputs: int = 64, classes: int = 10) -> int:
    """d of the inputs -> hidden -> classes MLP: its weights and biases."""
    return inputs * hidden + hidden + hidden * classes + classes


class DigitsMLP(_ClientData):
    """inputs -> hidden -> classes MLP with cross-entropy; 64 -> hidden -> 10 on scikit-learn's digits.

    Also on MNIST-1D (40 -> hidden -> 10) and dataset tables. Subclasses
    change the model (:meth:`_model`) and its memory estimate (:meth:`_estimate`).
    """

    classification = True
    # The scenario key that sets the model's size, named when a problem does not fit in memory.
    size_key = "problem.hidden"

    @staticmethod
    def _estimate(cfg: dict[str, Any], rows: int, features: int, classes: int) -> tuple[int, int]:
        """(bytes the data and every row's activations take while the problem is built and evaluated, d)."""
        h = cfg["problem.hidden"]
        # Features in float64 (twice while test rows are held out) and as float32 tensors;
        # every row's hidden activations, their tanh and their gradient (float32).
        return rows * (features * 20 + h * 12), _mlp_size(h, features, classes)

    def __init__(self, cfg: dict[str, Any]):
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        from fl_clip21.datasets import is_table, load_mnist1d, load_table

        parts = None
        size = functools.partial(self._estimate, cfg)
        if is_table(cfg["problem.dataset"]) or cfg["problem.dataset"] == "mnist1d":
            table = load_table(cfg, size, test=True) if is_table(cfg["problem.dataset"]) else load_mnist1d(cfg, size)
            X, y, Xt, yt, parts = table.X, table.y, table.X_test, table.y_test, table.parts
            classes = table.classes.size
        elif cfg["problem.dataset"] not in ("digits", "breast_cancer"):
            raise ConfigError(
                f"problem.dataset must be 'digits', 'mnist1d' or a dataset table for {cfg['problem.name']}, "
                f"got {cfg['problem.dataset']!r}"
            )
        else:
            check_memory(f"{self.size_key}={cfg[self.size_key]}", cfg, *size(_DIGITS_ROWS, 64, 10))
            X, y = load_digits(return_X_y=True)
            X, classes = X / 16.0, 10
            if cfg["problem.test-fraction"] > 0:
                X, Xt, y, yt = train_test_split(
                    X, y, test_size=cfg["problem.test-fraction"], random_state=cfg["seed"], stratify=y
                )
            else:
                Xt, yt = X, y
        super().__init__(X, y, cfg, parts)
        self.inputs, self.classes = X.shape[1], classes
        self.torch = torch
        self.Xtr = torch.tensor(self.X, dtype=torch.float32)
        self.ytr = torch.tensor(self.y, dtype=torch.int64)
        self.Xte = torch.tensor(Xt, dtype=torch.float32)
        self.yte = torch.tensor(yt, dtype=torch.int64)
        self.hidden = cfg["problem.hidden"]
        self.seed = cfg["seed"]
        # Bytes a row takes in a gradient computation (fl-clip21 tune sizes its batches of cells with it).
        self.row_bytes = size(1, self.inputs, self.classes)[0]
        self.layout = Layout.of(self.init_params())

    def _model(self):
        torch = self.torch
        return torch.nn.Sequential(
            torch.nn.Linear(self.inputs, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, self.classes)
        )

    def _seeded_model(self):
        """The model initialised from the scenario's seed, leaving torch's global generator as it was."""
        gen_state = self.torch.random.get_rng_state()
        self.torch.manual_seed(self.seed)
        try:
            return self._model()
        finally:
            self.torch.random.set_rng_state(gen_state)

    xp: backend.Backend = backend.NUMPY

    def on(self, xp: backend.Backend) -> DigitsMLP:
        """This problem computing on the backend ``xp``: on a torch device, the data and the module moved there."""
        out = copy.copy(self)
        out.xp = xp
        if isinstance(xp, backend.Torch):
            out.Xtr, out.ytr, out.Xte, out.yte = (t.to(xp.device) for t in (self.Xtr, self.ytr, self.Xte, self.yte))
            out._shell = copy.deepcopy(self._shell).to(xp.device)
        return out

    def init_params(self) -> Params:
        return {k: v.detach().cpu().numpy().copy() for k, v in self._shell.state_dict().items()}

    @functools.cached_property
    def _shell(self):
        """The module ``functional_call`` runs with a model's tensors (its own weights are never used)."""
        return self._seeded_model()

    def _tensors(self, flat: np.ndarray) -> dict:
        """The model's named tensors over a flat (d,) or (m, d) array or tensor (views, no copy)."""
        t = flat if backend.is_tensor(flat) else self.torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        lead = t.shape[:-1]
        out, start = {}, 0
        for name, shape, size in zip(self.layout.names, self.layout.shapes, self.layout.sizes):
            out[name] = t[..., start : start + size].reshape(*lead, *shape)
            start += size
        return out

    @functools.cached_property
    def _per_client_grad(self):
        """``torch.func``: (params, X, y, mask) -> (gradient, loss) of one client's masked mean cross-entropy."""
        torch = self.torch

        def loss(params, X, y, mask):
            logits = torch.func.functional_call(self._shell, params, (X,))
            ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            return (ce * mask).sum() / mask.sum()

        return torch.func.grad_and_value(loss)

    def _padded(self, clients: np.ndarray, minibatch: Minibatch | None):
        """Every client's rows as an (m, L) index and mask, L its largest count (vmap needs equal shapes)."""
        rows, owner, _ = self.rows(clients, minibatch)
        counts = np.bincount(owner, minlength=len(clients))
        width = int(counts.max())
        position = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
        index = np.zeros((len(clients), width), dtype=np.int64)
        mask = np.zeros((len(clients), width), dtype=np.float32)
        index[owner, position] = rows
        mask[owner, position] = 1.0
        return self.torch.from_numpy(index).to(self.Xtr.device), self.torch.from_numpy(mask).to(self.Xtr.device)

    def _client_grads(self, points: np.ndarray, clients: np.ndarray, minibatch: Minibatch | None):
        torch = self.torch
        index, mask = self._padded(np.asarray(clients, dtype=np.int64), minibatch)
        per_row = points.ndim == 2
        fn = torch.func.vmap(self._per_client_grad, in_dims=(0 if per_row else None, 0, 0, 0))
        grads, losses = fn(self._tensors(points), self.Xtr[index], self.ytr[index], mask)
        flat = torch.cat([grads[name].reshape(len(clients), -1) for name in self.layout.names], dim=1)
        if isinstance(self.xp, backend.Torch):
            return flat.detach(), losses.detach()
        return flat.detach().numpy(), losses.detach().numpy()

    def grads(self, points, clients, minibatch=None, point_of_row=None) -> np.ndarray:
        """Every listed client's (minibatch) gradient in one ``vmap`` of ``grad`` over the clients."""
        return self._client_grads(_rows_of(points, point_of_row), clients, minibatch)[0]

    def evaluate(self, x, client_grads: bool = False) -> Evaluation:
        """f and its gradient from every client's full gradient (one vmap), test accuracy."""
        grads, losses = self._client_grads(x, np.arange(self.num_clients), None)
        with self.torch.no_grad():
            logits = self.torch.func.functional_call(self._shell, self._tensors(x), (self.Xte,))
        accuracy = float((logits.argmax(dim=1) == self.yte).float().mean())
        mean = self.xp.cast(self.xp.sum_rows(grads) / len(grads), np.float32)
        return Evaluation(self.xp.mean(losses), mean, accuracy, grads if client_grads else None)


class CNN1D(DigitsMLP):
    """A small 1-D CNN with cross-entropy: each row's features as one signal of ``inputs`` samples.

    Conv1d(1, c, 5) -> ReLU -> MaxPool(2) -> Conv1d(c, c, 5) -> ReLU -> max over
    the signal -> Linear(c, classes), c = ``problem.channels``, both
    convolutions padded to keep the length. The global max pool makes the
    features shift-invariant (MNIST-1D's digits sit anywhere in the signal):
    with c = 16 it reaches 0.96 test accuracy on MNIST-1D trained centrally
    (the MLP at about the same d = 1.6k: 0.55). Per-client gradients are the
    MLP's ``torch.func`` ``vmap(grad)`` over clients, batched minibatches alike.
    """

    size_key = "problem.channels"

    @staticmethod
    def _estimate(cfg: dict[str, Any], rows: int, features: int, classes: int) -> tuple[int, int]:
        c = cfg["problem.channels"]
        # Features as for the MLP; per row about six float32 activations of c x inputs
        # (the two convolutions, their ReLUs, the pooled signal, and their gradients).
        return rows * (features * 20 + c * features * 24), _cnn1d_size(c, classes)

    def __init__(self, cfg: dict[str, Any]):
        self.channels = cfg["problem.channels"]
        super().__init__(cfg)

    def _model(self):
        nn, c = self.torch.nn, self.channels
        return nn.Sequential(
            nn.Unflatten(1, (1, self.inputs)),
            nn.Conv1d(1, c, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True),
            nn.Conv1d(c, c, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten(),
            nn.Linear(c, self.classes),
        )


def _cnn1d_size(channels: int, classes: int = 10) -> int:
    """d of :class:`CNN1D`: its two convolutions' and its linear layer's weights and biases (any input length)."""
    return (5 * channels + channels) + (5 * channels * channels + channels) + (channels * classes + classes)


# --- building ---------------------------------------------------------------


# What a plug-in problem must have (the array-dict protocol of DictAPI): attributes, then methods.
PROBLEM_ATTRIBUTES = ("num_clients", "classification")
PROBLEM_METHODS = ("init_params", "client_grad", "loss", "grad", "accuracy")


class PluginProblem(DictAPI):
    """A plug-in's array-dict problem as a batched one: its ``client_grad`` called client by client.

    A minibatch client gets a numpy Generator seeded from its counter-based
    stream (seed, round, step, client): the draws do not depend on the batch.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.num_clients = int(inner.num_clients)
        self.classification = bool(inner.classification)
        self.layout = Layout.of(inner.init_params())

    def init_params(self) -> Params:
        return self.inner.init_params()

    def grads(self, points, clients, minibatch=None, point_of_row=None) -> np.ndarray:
        points = _rows_of(points, point_of_row)
        out = self.layout.zeros(len(clients))
        for j, i in enumerate(np.asarray(clients, dtype=np.int64)):
            point = points[j] if points.ndim == 2 else points
            rng, size = None, None
            if minibatch is not None:
                words = streams.uint64s(minibatch.seed, streams.BATCH, np.array([i]), minibatch.round, 4, minibatch.step)
                rng, size = np.random.default_rng(words[0]), minibatch.size
            out[j] = self.layout.flatten(self.inner.client_grad(int(i), self.layout.unflatten(point), rng, size))
        return out

    def evaluate(self, x, client_grads: bool = False) -> Evaluation:
        params = self.layout.unflatten(x)
        return Evaluation(
            float(self.inner.loss(params)), self.layout.flatten(self.inner.grad(params)), self.inner.accuracy(params)
        )


def _build(cfg: dict[str, Any]) -> Problem:
    name = cfg["problem.name"]
    if name == "mean-estimation":
        return MeanEstimation(_load_centers(cfg))
    if name == "logreg":
        return LogReg(cfg)
    if name == "mlp":
        return DigitsMLP(cfg)
    if name == "cnn1d":
        return CNN1D(cfg)
    problem = PluginProblem(_plugin(cfg, name))
    if problem.num_clients != cfg["num-clients"]:
        raise ConfigError(
            f"num-clients must equal the {problem.num_clients} clients of problem {name!r}, got {cfg['num-clients']}"
        )
    return problem


def _plugin(cfg: dict[str, Any], name: str) -> Problem:
    """``factory(cfg)`` of the plug-in ``module.path:factory``, checked to be a :class:`Problem`.

    Importing the module and calling the factory run its code: whatever they
    raise (SystemExit too) becomes a :class:`ConfigError` naming ``problem.name``.
    """
    parts = plugin_parts(name)
    if parts is None:
        raise ConfigError(
            f"problem.name must be mean-estimation, logreg, mlp, cnn1d or 'module.path:factory', got {name!r}"
        )
    module_name, attr = parts
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the module's own code ran
        raise ConfigError(
            f"problem.name {name!r}: module {module_name!r} could not be imported ({_why(e)})"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"problem.name {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(f"problem.name {name!r}: {attr!r} must be callable, got a {type(factory).__name__}")
    try:
        problem = factory(cfg)
    except ConfigError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the plug-in's own code ran
        raise ConfigError(f"problem.name {name!r}: the factory raised {_why(e)}") from None
    missing = [a for a in PROBLEM_ATTRIBUTES if not hasattr(problem, a)]
    missing += [m for m in PROBLEM_METHODS if not callable(getattr(problem, m, None))]
    if missing:
        raise ConfigError(
            f"problem.name {name!r}: the factory returned a {type(problem).__name__}, which lacks "
            f"{', '.join(missing)} of the Problem protocol (fl_clip21.problems.Problem)"
        )
    n = problem.num_clients
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"problem.name {name!r}: num_clients must be an integer >= 1, got {n!r}")
    if not isinstance(problem.classification, (bool, np.bool_)):
        raise ConfigError(
            f"problem.name {name!r}: classification must be True or False, got {problem.classification!r}"
        )
    return problem


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


@functools.lru_cache(maxsize=4)
def _build_cached(key: str) -> Problem:
    return _build(json.loads(key))


class _OnHost:
    """A problem without a backend of its own (a plug-in) for an engine on torch: arrays cross at its edges."""

    def __init__(self, inner: Problem, xp: backend.Backend):
        self.inner, self.xp = inner, xp
        self.num_clients, self.classification, self.layout = inner.num_clients, inner.classification, inner.layout

    def init_params(self) -> Params:
        return self.inner.init_params()

    def grads(self, points, clients, minibatch=None, point_of_row=None):
        return self.xp.asarray(self.inner.grads(self.xp.to_numpy(points), clients, minibatch, point_of_row))

    def evaluate(self, x, client_grads: bool = False) -> Evaluation:
        return self._back(self.inner.evaluate(self.xp.to_numpy(x), client_grads))

    def evaluate_many(self, xs, client_grads: bool = False) -> list[Evaluation]:
        return [self._back(ev) for ev in self.inner.evaluate_many(self.xp.to_numpy(xs), client_grads)]

    def _back(self, ev: Evaluation) -> Evaluation:
        grads = None if ev.client_grads is None else self.xp.asarray(ev.client_grads)
        return Evaluation(ev.loss, self.xp.asarray(ev.grad), ev.accuracy, grads)


def on_backend(problem: Problem, xp: backend.Backend) -> Problem:
    """``problem`` computing on the backend ``xp``: its own copy there (built-in problems), else one that converts."""
    if xp is backend.NUMPY:
        return problem
    on = getattr(type(problem), "on", None)
    return on(problem, xp) if callable(on) else _OnHost(problem, xp)


@functools.lru_cache(maxsize=2)
def _on_device_cached(key: str, device: str) -> Problem:
    return on_backend(_build_cached(key), backend.get(device))


_PROBLEM_KEYS = ("seed", "num-clients")


def build_problem(cfg: dict[str, Any], device: str = "numpy") -> Problem:
    """Build (once per process and problem) the problem a scenario describes, computing on ``device``.

    The engines that compute on numpy (Flower's) call this without ``device``,
    whatever the scenario's ``device`` key says; the batched engine passes it.
    """
    key = json.dumps(
        {k: v for k, v in cfg.items() if k in _PROBLEM_KEYS or k.startswith(("problem.", "partition."))},
        sort_keys=True,
    )
    return _build_cached(key) if device == "numpy" else _on_device_cached(key, device)
