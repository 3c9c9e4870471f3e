"""Federated problems: client objectives f_i, the global f = (1/n) sum_i f_i.

Built in: ``mean-estimation``, ``logreg`` (non-convex regulariser, breast_cancer,
scikit-learn's synthetic ``make_classification`` data or a LibSVM file) and ``mlp`` (a small torch classifier on digits);
both of the last two also take a dataset table (:mod:`fl_clip21.datasets`). A plug-in
problem is named ``module:factory``; ``factory(cfg)`` gets the resolved
scenario dict and returns an object with the :class:`Problem` methods.

Everything here is deterministic in the scenario (seed included), so the
server and every client build the same problem independently. Sizes are
checked before anything is allocated (:func:`check_memory`), data files before
their data is read, and a plug-in's import, factory and result before it is used.
"""

from __future__ import annotations

import functools
import importlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fl_clip21.config import MAX_DIM, MAX_FEATURES, MAX_ROWS, ConfigError, plugin_parts
from fl_clip21.core import Params


class Problem(Protocol):
    """What an engine needs from a problem."""

    num_clients: int
    classification: bool

    def init_params(self) -> Params: ...

    def client_grad(
        self, i: int, params: Params, rng: np.random.Generator | None = None, batch_size: int | None = None
    ) -> Params:
        """Gradient of f_i at params; a minibatch one when ``rng`` is given."""

    def loss(self, params: Params) -> float: ...

    def grad(self, params: Params) -> Params:
        """Gradient of the global f = (1/n) sum_i f_i."""

    def accuracy(self, params: Params) -> float | None: ...

    # Optional: ``client_grads(params, clients, rngs, batch_size) -> list[Params]``,
    # every listed client's ``client_grad`` in one pass (see :func:`client_grads`).


def client_grads(
    problem: Problem,
    params: Params,
    clients: Sequence[int],
    rngs: Sequence[np.random.Generator | None] | None = None,
    batch_size: int | None = None,
) -> list[Params]:
    """``[problem.client_grad(i, params, rngs[j], batch_size) for j, i in enumerate(clients)]``.

    Uses the problem's batched ``client_grads`` when it has one. Either way each
    ``rngs[j]`` is drawn from exactly as client ``clients[j]``'s own
    ``client_grad`` would draw from it, so minibatches do not depend on how the
    gradients were computed.
    """
    rngs = list(rngs) if rngs is not None else [None] * len(clients)
    if len(rngs) != len(clients):
        raise ValueError(f"client_grads needs one rng per client, got {len(rngs)} for {len(clients)} clients")
    batched = getattr(problem, "client_grads", None)
    if batched is not None:
        return batched(params, clients, rngs, batch_size)
    return [problem.client_grad(i, params, r, batch_size) for i, r in zip(clients, rngs)]


def _segment_starts(sizes: np.ndarray) -> np.ndarray:
    """Offsets of consecutive segments of ``sizes`` rows (for ``np.add.reduceat``)."""
    return np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)


# --- data partitioning with flwr-datasets ----------------------------------


def partition_indices(labels: np.ndarray, cfg: dict[str, Any]) -> list[np.ndarray]:
    """Split row indices among ``num-clients`` clients with a flwr-datasets partitioner."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pyarrow's, inside datasets
        return _partition_indices(labels, cfg)


def client_sizes(cfg: dict[str, Any], num_rows: int) -> list[int] | None:
    """Rows per client that ``partition.sizes`` asks for (None: "equal", the partition's own).

    flwr-datasets' Linear/Square/ExponentialPartitioner rule: client i gets a share
    of ``num_rows`` proportional to i+1, (i+1)^2 or e^(i+1), the remainder to the last.
    """
    from flwr_datasets.partitioner import ExponentialPartitioner, LinearPartitioner, SquarePartitioner

    n, sizes = cfg["num-clients"], cfg.get("partition.sizes", "equal")
    if sizes == "equal":
        return None
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


def _partition_indices(labels: np.ndarray, cfg: dict[str, Any]) -> list[np.ndarray]:
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        InnerDirichletPartitioner,
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
        part = InnerDirichletPartitioner(
            partition_sizes=counts, partition_by="label", alpha=cfg["partition.alpha"], seed=seed
        )
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
                f"each of num-clients={n} clients data (flwr-datasets: {e}); use a larger alpha or fewer clients"
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


class MeanEstimation:
    """f_i(x) = 0.5 * ||x - a_i||^2; the minimiser of f is the mean of the a_i."""

    classification = False

    def __init__(self, centers: np.ndarray):
        self.centers = np.asarray(centers, dtype=np.float64)
        self.num_clients = self.centers.shape[0]

    def init_params(self) -> Params:
        return {"x": np.zeros(self.centers.shape[1])}

    def client_grad(self, i, params, rng=None, batch_size=None) -> Params:
        return {"x": params["x"] - self.centers[i]}

    def client_grads(self, params, clients, rngs=None, batch_size=None) -> list[Params]:
        return [{"x": g} for g in params["x"] - self.centers[np.asarray(clients, dtype=np.int64)]]

    def loss(self, params) -> float:
        return float(0.5 * np.mean(np.sum((params["x"] - self.centers) ** 2, axis=1)))

    def grad(self, params) -> Params:
        return {"x": params["x"] - self.centers.mean(axis=0)}

    def accuracy(self, params) -> None:
        return None


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


class _ClientData:
    """Per-client (X_i, y_i) built by a partitioner over the whole data."""

    def __init__(self, X: np.ndarray, y: np.ndarray, cfg: dict[str, Any], parts: list[np.ndarray] | None = None):
        self.X, self.y = X, y
        self.parts = partition_indices(y, cfg) if parts is None else parts
        self.num_clients = len(self.parts)

    def batch(self, i: int, rng: np.random.Generator | None, batch_size: int | None) -> np.ndarray:
        rows = self.parts[i]
        if rng is None or batch_size is None or batch_size >= rows.size:
            return rows
        return rng.choice(rows, size=batch_size, replace=False)


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
        super().__init__(X, labels, cfg, parts)
        self.signs = 2.0 * labels - 1.0
        self.reg = cfg["problem.reg"]

    def init_params(self) -> Params:
        return {"w": np.zeros(self.X.shape[1])}

    def _grad_rows(self, w, rows) -> np.ndarray:
        z = self.signs[rows] * (self.X[rows] @ w)
        s = -self.signs[rows] * _sigmoid(-z)
        return self.X[rows].T @ s / rows.size + self._reg_grad(w)

    def _reg_grad(self, w) -> np.ndarray:
        return self.reg * 2 * w / (1 + w**2) ** 2

    def client_grad(self, i, params, rng=None, batch_size=None) -> Params:
        return {"w": self._grad_rows(params["w"], self.batch(i, rng, batch_size))}

    def client_grads(self, params, clients, rngs=None, batch_size=None) -> list[Params]:
        """Every listed client's (minibatch) gradient from one matrix product and segment sums."""
        rngs = rngs if rngs is not None else [None] * len(clients)
        rows = [self.batch(i, r, batch_size) for i, r in zip(clients, rngs)]
        if not rows:
            return []
        sizes = np.array([r.size for r in rows])
        idx = np.concatenate(rows)
        X, signs, w = self.X[idx], self.signs[idx], params["w"]
        s = -signs * _sigmoid(-signs * (X @ w))
        sums = np.add.reduceat(X * s[:, None], _segment_starts(sizes), axis=0)
        per_client = sums / sizes[:, None] + self._reg_grad(w)
        return [{"w": g} for g in per_client]

    @functools.cached_property
    def _stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """X and signs with every client's rows one after the other; segment starts, |P_i|, 1/|P_i| per row."""
        sizes = np.array([p.size for p in self.parts])
        idx = np.concatenate(self.parts)
        return self.X[idx], self.signs[idx], _segment_starts(sizes), sizes, np.repeat(1.0 / sizes, sizes)

    def loss(self, params) -> float:
        """f = (1/n) sum_i f_i, every client's rows in one pass."""
        X, signs, starts, sizes, _ = self._stacked
        w = params["w"]
        per_row = np.logaddexp(0.0, -signs * (X @ w))
        data = np.add.reduceat(per_row, starts) / sizes
        return float(np.mean(data) + self.reg * np.sum(w**2 / (1 + w**2)))

    def grad(self, params) -> Params:
        """Gradient of f = (1/n) sum_i f_i, every client's rows in one matrix product."""
        X, signs, _, _, row_weight = self._stacked
        w = params["w"]
        s = -signs * _sigmoid(-signs * (X @ w))
        return {"w": X.T @ (s * row_weight) / self.num_clients + self._reg_grad(w)}

    def accuracy(self, params) -> float:
        return float(np.mean((self.X @ params["w"] > 0) == (self.signs > 0)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


# --- a small torch MLP on digits or a dataset table ---------------------------


_DIGITS_ROWS = 1797  # scikit-learn's digits


def _mlp_size(hidden: int, inputs: int = 64, classes: int = 10) -> int:
    """d of the inputs -> hidden -> classes MLP: its weights and biases."""
    return inputs * hidden + hidden + hidden * classes + classes


class DigitsMLP(_ClientData):
    """inputs -> hidden -> classes MLP with cross-entropy; 64 -> hidden -> 10 on scikit-learn's digits."""

    classification = True

    def __init__(self, cfg: dict[str, Any]):
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        from fl_clip21.datasets import is_table, load_table

        h, parts = cfg["problem.hidden"], None
        if is_table(cfg["problem.dataset"]):
            # Features in float64 (twice while test rows are held out) and as float32 tensors;
            # every row's hidden activations, their tanh and their gradient (float32).
            table = load_table(cfg, lambda rows, f, k: (rows * (f * 20 + h * 12), _mlp_size(h, f, k)), test=True)
            X, y, Xt, yt, parts = table.X, table.y, table.X_test, table.y_test, table.parts
            classes = table.classes.size
        elif cfg["problem.dataset"] not in ("digits", "breast_cancer"):
            raise ConfigError(
                f"problem.dataset must be 'digits' or a dataset table for mlp, got {cfg['problem.dataset']!r}"
            )
        else:
            # The hidden activations of every digits row, their tanh and their gradient (float32).
            check_memory(f"problem.hidden={h}", cfg, _DIGITS_ROWS * h * 4 * 3, _mlp_size(h))
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
        self.Xtr = torch.tensor(X, dtype=torch.float32)
        self.ytr = torch.tensor(y, dtype=torch.int64)
        self.Xte = torch.tensor(Xt, dtype=torch.float32)
        self.yte = torch.tensor(yt, dtype=torch.int64)
        self.hidden = cfg["problem.hidden"]
        self.seed = cfg["seed"]

    def _model(self):
        torch = self.torch
        return torch.nn.Sequential(
            torch.nn.Linear(self.inputs, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, self.classes)
        )

    def init_params(self) -> Params:
        gen_state = self.torch.random.get_rng_state()
        self.torch.manual_seed(self.seed)
        try:
            model = self._model()
        finally:
            self.torch.random.set_rng_state(gen_state)
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def _forward(self, params, X):
        torch = self.torch
        tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        return torch.func.functional_call(self._model_shell, tensors, (X,)), tensors

    @functools.cached_property
    def _model_shell(self):
        return self._model()

    def _grad_rows(self, params, rows) -> Params:
        torch = self.torch
        logits, tensors = self._forward(params, self.Xtr[rows])
        loss = torch.nn.functional.cross_entropy(logits, self.ytr[rows])
        grads = torch.autograd.grad(loss, list(tensors.values()))
        return {k: g.numpy() for k, g in zip(tensors, grads)}

    def client_grad(self, i, params, rng=None, batch_size=None) -> Params:
        return self._grad_rows(params, self.batch(i, rng, batch_size))

    def loss(self, params) -> float:
        torch = self.torch
        with torch.no_grad():
            losses = []
            for rows in self.parts:
                logits, _ = self._forward(params, self.Xtr[rows])
                losses.append(float(torch.nn.functional.cross_entropy(logits, self.ytr[rows])))
        return float(np.mean(losses))

    def grad(self, params) -> Params:
        from fl_clip21.core import mean

        return mean([self._grad_rows(params, rows) for rows in self.parts])

    def accuracy(self, params) -> float:
        with self.torch.no_grad():
            logits, _ = self._forward(params, self.Xte)
        return float((logits.argmax(dim=1) == self.yte).float().mean())


# --- building ---------------------------------------------------------------


# What the engines use of a problem (the Problem protocol): attributes, then methods.
PROBLEM_ATTRIBUTES = ("num_clients", "classification")
PROBLEM_METHODS = ("init_params", "client_grad", "loss", "grad", "accuracy")


def _build(cfg: dict[str, Any]) -> Problem:
    name = cfg["problem.name"]
    if name == "mean-estimation":
        return MeanEstimation(_load_centers(cfg))
    if name == "logreg":
        return LogReg(cfg)
    if name == "mlp":
        return DigitsMLP(cfg)
    problem = _plugin(cfg, name)
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
        raise ConfigError(f"problem.name must be mean-estimation, logreg, mlp or 'module.path:factory', got {name!r}")
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


_PROBLEM_KEYS = ("seed", "num-clients")


def build_problem(cfg: dict[str, Any]) -> Problem:
    """Build (once per process and problem) the problem a scenario describes."""
    key = {k: v for k, v in cfg.items() if k in _PROBLEM_KEYS or k.startswith(("problem.", "partition."))}
    return _build_cached(json.dumps(key, sort_keys=True))
