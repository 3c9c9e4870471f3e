"""Dataset tables for logreg, mlp and cnn1d: Hugging Face Hub datasets, parquet, CSV, saved folders; MNIST-1D.

``problem.dataset`` names a table when it is a Hub dataset ``owner/name``
(:func:`fl_clip21.config.hub_dataset`), a folder or a ``.parquet`` / ``.csv``
file. Hub names, parquet and CSV files and folders of parquet files are loaded
with flwr-datasets' ``FederatedDataset`` (its ``dataset=`` and the
``data_files`` / ``data_dir`` it passes to ``datasets.load_dataset``); a folder
written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``'s) with
``datasets.load_from_disk``, since ``load_dataset`` in ``FederatedDataset`` 0.6
refuses a saved ``Dataset`` and misreads a saved ``DatasetDict`` as JSON. A
single file or saved ``Dataset`` is the split ``train``; a parquet folder's
splits come from its file names as on the Hub (``train.parquet``,
``test-00000-of-00001.parquet``; otherwise all of it is ``train``).

Columns are named by scenario keys: ``problem.features-column`` (columns of a
number or a fixed-length list of numbers per row, concatenated in order; empty:
every other column), ``problem.label-column``, ``partition.id-column`` for the
``natural-id`` partition (flwr-datasets' ``NaturalIdPartitioner``: client i
holds the rows of the i-th smallest id). The other partitions run on the labels
in :func:`fl_clip21.problems.partition_indices`, as for every dataset.

Sizes are checked from the table's schema and list offsets before a feature is
made a dense array (:func:`fl_clip21.problems.check_memory`). Whatever goes
wrong is a :class:`~fl_clip21.config.ConfigError` naming the key and the value,
with the libraries' warnings, retries and progress bars kept off the terminal.

``problem.dataset = "mnist1d"`` is generated here, not loaded: the ``mnist1d``
package's procedural generator (:func:`mnist1d`), seeded by the scenario's
``seed``, makes ``problem.rows`` rows of 40 features and 10 classes offline.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fl_clip21.config import MAX_FEATURES, MAX_ROWS, TABLE_SUFFIXES, ConfigError, hub_dataset
from fl_clip21.problems import check_memory

# MNIST-1D: each row a 1-D signal of 40 numbers, one of 10 digit templates transformed.
MNIST1D_FEATURES = 40
MNIST1D_CLASSES = 10

# (rows, features, classes) -> (bytes the problem's data takes while it is built, its model's d).
SizeFn = Callable[[int, int, int], tuple[int, int]]


class Table(NamedTuple):
    """A dataset table as a problem uses it.

    ``X`` is rows x features (float64), ``y`` the class of each row as a code
    0..K-1 (code k is the label ``classes[k]``, in sorted order), ``X_test`` and
    ``y_test`` the rows of the test accuracy (None unless asked for), ``parts``
    the rows of each client for ``natural-id`` (None: the problem partitions).
    """

    X: np.ndarray
    y: np.ndarray
    classes: np.ndarray
    X_test: np.ndarray | None
    y_test: np.ndarray | None
    parts: list[np.ndarray] | None


def is_table(src: str) -> bool:
    """Whether ``problem.dataset`` ``src`` is loaded here: a Hub name, a folder, a .parquet or .csv file."""
    return hub_dataset(src) or Path(src).is_dir() or src.lower().endswith(TABLE_SUFFIXES)


def load_table(cfg: dict[str, Any], size: SizeFn, *, binary: bool = False, test: bool = False) -> Table:
    """The features, labels and (natural-id) client rows of the scenario's dataset table.

    Parameters
    ----------
    cfg:
        The resolved scenario (``problem.dataset``, the column and split keys,
        ``partition.*``, ``num-clients``, ``seed``).
    size:
        The problem's memory estimate for ``check_memory``, from the table's
        shape before the features are read.
    binary:
        The labels must be of exactly 2 classes (logreg); else of at least 2.
    test:
        Also return test rows: ``problem.test-split``, or else
        ``problem.test-fraction`` of ``problem.split`` held out (stratified,
        seeded; 0: the training rows themselves), as the digits MLP does.

    Raises
    ------
    ConfigError
        Naming the key and the value: a dataset that cannot be loaded, a split
        or column it lacks, features that are not numbers or not finite, labels
        of one class, a size beyond the caps or the memory available, a
        ``natural-id`` with another number of ids than ``num-clients``.
    """
    src = cfg["problem.dataset"]
    wanted = {"problem.split": cfg["problem.split"]}
    if test and cfg["problem.test-split"]:
        wanted["problem.test-split"] = cfg["problem.test-split"]
    splits = _load_splits(src, wanted)
    train = _arrow(splits[wanted["problem.split"]])
    features = _feature_columns(cfg, train.column_names, src)
    ids_col = cfg["partition.id-column"] if cfg["partition.kind"] == "natural-id" else None
    for key, col in (("problem.label-column", cfg["problem.label-column"]), ("partition.id-column", ids_col)):
        if col is not None:
            _check_has(train, key, col, src)
    widths = _widths(train, features, cfg, src)
    f, rows = sum(widths), train.num_rows
    held = _arrow(splits[wanted["problem.test-split"]]) if "problem.test-split" in wanted else None
    if held is not None:
        _check_has(held, "problem.label-column", cfg["problem.label-column"], src)
        held_widths = _widths(held, features, cfg, src)
        if held_widths != widths:
            raise ConfigError(
                f"problem.test-split {wanted['problem.test-split']!r} must have the features of problem.split "
                f"{wanted['problem.split']!r} ({f} numbers a row), got {sum(held_widths)} in problem.dataset={src!r}"
            )
    all_rows = rows + (held.num_rows if held is not None else 0)
    if all_rows > MAX_ROWS or f > MAX_FEATURES:
        raise ConfigError(
            f"problem.dataset must have at most {MAX_ROWS} rows and {MAX_FEATURES} features, "
            f"got {all_rows} rows x {f} features in {src!r}"
        )
    labels = _labels(train, cfg, src)
    classes, y = np.unique(labels, return_inverse=True)
    if classes.size < 2 or (binary and classes.size > 2):
        shown = ", ".join(map(repr, classes[:10].tolist())) + (", ..." if classes.size > 10 else "")
        raise ConfigError(
            f"problem.label-column {cfg['problem.label-column']!r} must hold {'2' if binary else 'at least 2'} "
            f"classes for {cfg['problem.name']}, got {classes.size} ({shown}) in problem.dataset={src!r}"
        )
    data_bytes, d = size(all_rows, f, classes.size)
    check_memory(f"problem.dataset={src!r} ({all_rows} rows x {f} features)", cfg, data_bytes, d)
    X = _matrix(train, features, widths, cfg, src)
    ids = _ids(train, ids_col, src) if ids_col is not None else None
    X_test = y_test = None
    if held is not None:
        X_test, y_test = _matrix(held, features, widths, cfg, src), _codes(_labels(held, cfg, src), classes, cfg, src)
    elif test:
        keep, out = _hold_out(y, cfg)
        X_test, y_test = X[out], y[out]
        X, y = X[keep], y[keep]
        ids = ids[keep] if ids is not None else None
    parts = _natural_parts(ids, cfg, src, held_out=test and held is None) if ids is not None else None
    return Table(X, y.astype(np.int64), classes, X_test, y_test, parts)


def mnist1d(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` rows of MNIST-1D made by the ``mnist1d`` package's generator: features (rows, 40), labels 0..9.

    ``mnist1d.data.make_dataset`` makes an equal number of rows of each digit
    (10 * ceil(rows / 10) in all), shuffles them and standardises the whole
    set; the first ``rows`` are kept. Nothing is downloaded or written:
    ``get_dataset``, which fetches the authors' pickled 5000 rows or caches a
    pickle in the working folder, is not used. The generator draws from
    numpy's and Python's global generators after seeding them with ``seed``;
    their states are put back afterwards. It costs about 0.2 ms a row on one
    core (20 s for 100,000 rows): a problem is built once per process.
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = -(-rows // MNIST1D_CLASSES) * MNIST1D_CLASSES
    args.train_split = 1.0  # the test rows are held out like every other dataset's (problem.test-fraction)
    args.seed = seed
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return np.asarray(data["x"][:rows], dtype=np.float64), np.asarray(data["y"][:rows], dtype=np.int64)


def load_mnist1d(cfg: dict[str, Any], size: SizeFn) -> Table:
    """MNIST-1D's ``problem.rows`` rows (seeded by ``seed``), ``problem.test-fraction`` held out (stratified).

    ``size`` is the problem's memory estimate, checked before anything is generated.
    """
    rows = cfg["problem.rows"]
    data_bytes, d = size(rows, MNIST1D_FEATURES, MNIST1D_CLASSES)
    check_memory(f"problem.dataset='mnist1d' with problem.rows={rows}", cfg, data_bytes, d)
    X, y = mnist1d(rows, cfg["seed"])
    found = np.unique(y).size
    if found < MNIST1D_CLASSES:
        raise ConfigError(
            f"problem.rows={rows} of problem.dataset='mnist1d' hold {found} of its {MNIST1D_CLASSES} digits; "
            "use more rows"
        )
    keep, out = _hold_out(y, cfg)
    return Table(X[keep], y[keep], np.arange(MNIST1D_CLASSES), X[out], y[out], None)


# --- loading -----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep what datasets, huggingface_hub and fsspec log or warn off the terminal.

    Offline, a Hub name makes huggingface_hub log each retry before the error,
    and a broken parquet file makes datasets log the error it then raises: the
    ConfigError made of that error says it all.
    """
    import datasets

    datasets.disable_progress_bars()
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub", "fsspec")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _pick(wanted: dict[str, str], src: str) -> Callable[[Any], Any]:
    """A FederatedDataset preprocessor keeping the ``wanted`` splits ({key: split}); a missing one is a ConfigError."""

    def pick(dd: Any) -> Any:
        from datasets import DatasetDict

        for key, split in wanted.items():
            if split not in dd:
                raise ConfigError(f"{key} must be a split of problem.dataset={src!r} ({', '.join(dd)}), got {split!r}")
        return DatasetDict({split: dd[split] for split in wanted.values()})

    return pick


def _load_splits(src: str, wanted: dict[str, str]) -> dict[str, Any]:
    """The ``datasets.Dataset`` of each wanted split of ``src``."""
    import datasets
    from flwr_datasets import FederatedDataset

    path = Path(src)
    with _quiet():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            try:
                saved = datasets.load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001 - datasets raises many kinds here
                raise ConfigError(
                    f"problem.dataset {src!r} could not be read as a folder saved by save_to_disk ({_why(e)})"
                ) from None
            dd = saved if isinstance(saved, datasets.DatasetDict) else datasets.DatasetDict({"train": saved})
            return dict(_pick(wanted, src)(dd))
        if hub_dataset(src):
            how = {"dataset": src}
            where = "from the Hugging Face Hub (offline? a typo? no file or folder has that path either)"
        elif path.is_dir():
            how, where = {"dataset": "parquet", "data_dir": str(path)}, "as a folder of parquet files"
        elif path.is_file():
            kind = path.suffix.lower().lstrip(".")
            how, where = {"dataset": kind, "data_files": str(path)}, f"as {kind}"
        else:
            raise ConfigError(f"problem.dataset file not found: {src!r}")
        # File order is kept (shuffle=False): the partitions shuffle with the scenario's seed.
        fds = FederatedDataset(
            partitioners={wanted["problem.split"]: 1}, shuffle=False, preprocessor=_pick(wanted, src), **how
        )
        try:
            return {split: fds.load_split(split) for split in wanted.values()}
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - loading runs datasets', fsspec's and the Hub client's code
            raise ConfigError(f"problem.dataset {src!r} could not be loaded {where}: {_why(e)}") from None


def _why(e: BaseException) -> str:
    """``Type: message`` on one line: the CLI shows a ConfigError as one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Split(NamedTuple):
    """A split's pyarrow Table in row order, and its datasets Features (their names of the column types)."""

    table: Any
    features: Any

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def chunks(self, col: str) -> list[Any]:
        return [c for c in self.table.column(col).chunks if len(c)]


def _arrow(ds: Any) -> _Split:
    """The split's columns, memory-mapped where the dataset is (a slice, not a copy)."""
    return _Split(ds.with_format("arrow")[:], ds.features)


# --- columns -----------------------------------------------------------------------


def _check_has(split: _Split, key: str, col: str, src: str) -> None:
    if col not in split.column_names:
        raise ConfigError(
            f"{key} must be a column of problem.dataset={src!r} ({', '.join(split.column_names)}), got {col!r}"
        )


def _feature_columns(cfg: dict[str, Any], names: list[str], src: str) -> list[str]:
    given = cfg["problem.features-column"]
    if given.strip():
        cols = [c.strip() for c in given.split(",")]
        missing = [c for c in cols if c not in names]
        if missing:
            raise ConfigError(
                f"problem.features-column {given!r} names {missing[0]!r}, which is not a column of "
                f"problem.dataset={src!r} ({', '.join(names)})"
            )
        return cols
    others = {cfg["problem.label-column"], cfg["partition.id-column"]}
    cols = [c for c in names if c not in others]
    if not cols:
        raise ConfigError(
            f"problem.features-column '' takes every column but the label and id columns, and "
            f"problem.dataset={src!r} has no other ({', '.join(names)})"
        )
    return cols


def _numbers(arr: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)


def _is_list(arr: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)


def _flat(chunk: Any, bad: Callable[[str], ConfigError]) -> tuple[Any, int]:
    """The numbers of a column chunk in row order and how many each row holds (lists flattened)."""
    import pyarrow.compute as pc

    width = 1
    while _is_list(chunk):
        if chunk.null_count:
            raise bad(f"must hold a list in every row, got {chunk.null_count} missing (null)")
        bounds = pc.min_max(pc.list_value_length(chunk))
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if lo != hi:
            raise bad(f"must hold lists of one length, got lengths {lo} to {hi}")
        width *= hi
        chunk = pc.list_flatten(chunk)
    if not _numbers(chunk):
        raise bad("must hold numbers or fixed-length lists of numbers")
    if chunk.null_count:
        raise bad(f"must hold a number in every place, got {chunk.null_count} missing (null)")
    return chunk, width


def _feature_error(cfg: dict[str, Any], split: _Split, col: str, src: str) -> Callable[[str], ConfigError]:
    def bad(rule: str) -> ConfigError:
        return ConfigError(
            f"problem.features-column {cfg['problem.features-column']!r}: column {col!r} ({split.features[col]}) "
            f"{rule} in problem.dataset={src!r}"
        )

    return bad


def _widths(split: _Split, features: list[str], cfg: dict[str, Any], src: str) -> list[int]:
    """Numbers per row of each feature column, from the schema and list offsets alone."""
    out = []
    for col in features:
        bad = _feature_error(cfg, split, col, src)
        widths = {_flat(chunk, bad)[1] for chunk in split.chunks(col)}
        if len(widths) > 1:
            raise bad(f"must hold lists of one length, got lengths {min(widths)} to {max(widths)}")
        width = widths.pop() if widths else 1
        if width == 0:
            raise bad("must hold at least one number a row")
        out.append(width)
    return out


def _matrix(split: _Split, features: list[str], widths: list[int], cfg: dict[str, Any], src: str) -> np.ndarray:
    """The rows x sum(widths) float64 features, refused if one is nan or inf."""
    X = np.empty((split.num_rows, sum(widths)))
    c0 = 0
    for col, width in zip(features, widths):
        bad = _feature_error(cfg, split, col, src)
        r0 = 0
        for chunk in split.chunks(col):
            values, _ = _flat(chunk, bad)
            block = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
            X[r0:r0 + len(chunk), c0:c0 + width] = block.reshape(len(chunk), width)
            r0 += len(chunk)
        bad_values = int(np.count_nonzero(~np.isfinite(X[:, c0:c0 + width])))
        if bad_values:
            raise bad(f"must hold finite numbers, got {bad_values} nan or inf values")
        c0 += width
    return X


def _scalars(split: _Split, key: str, col: str, src: str) -> np.ndarray:
    """One value per row of a label or id column: numbers, bools or strings, none missing."""
    import pyarrow as pa

    column = split.table.column(col)
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(
            f"{key} {col!r} must hold one number, bool or string a row, got {split.features[col]} "
            f"in problem.dataset={src!r}"
        )
    if column.null_count:
        raise ConfigError(f"{key} {col!r} has {column.null_count} missing values (null) in problem.dataset={src!r}")
    values = column.to_numpy()
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise ConfigError(f"{key} {col!r} must hold finite values, got nan or inf in problem.dataset={src!r}")
    return values


def _labels(split: _Split, cfg: dict[str, Any], src: str) -> np.ndarray:
    return _scalars(split, "problem.label-column", cfg["problem.label-column"], src)


def _ids(split: _Split, col: str, src: str) -> np.ndarray:
    return _scalars(split, "partition.id-column", col, src)


def _codes(labels: np.ndarray, classes: np.ndarray, cfg: dict[str, Any], src: str) -> np.ndarray:
    """The training split's class code of each test label; a label it lacks is a ConfigError."""
    at = np.minimum(np.searchsorted(classes, labels), classes.size - 1)
    unseen = labels[classes[at] != labels]
    if unseen.size:
        raise ConfigError(
            f"problem.test-split {cfg['problem.test-split']!r} has labels that problem.split "
            f"{cfg['problem.split']!r} lacks ({unseen[0]!r}, ...) in problem.dataset={src!r}"
        )
    return at.astype(np.int64)


# --- rows ----------------------------------------------------------------------------


def _hold_out(y: np.ndarray, cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Training and test rows: ``problem.test-fraction`` held out, stratified and seeded (0: all rows both)."""
    from sklearn.model_selection import train_test_split

    share, rows = cfg["problem.test-fraction"], np.arange(y.size)
    if share == 0:
        return rows, rows
    try:
        keep, out = train_test_split(rows, test_size=share, random_state=cfg["seed"], stratify=y)
    except ValueError as e:
        raise ConfigError(
            f"problem.test-fraction={share!r} cannot hold out a stratified test set of the {y.size} rows "
            f"({e}); set another fraction, 0, or problem.test-split"
        ) from None
    return np.sort(keep), np.sort(out)


def _natural_parts(ids: np.ndarray, cfg: dict[str, Any], src: str, *, held_out: bool) -> list[np.ndarray]:
    """Client i's rows: those of the i-th smallest id (flwr-datasets' NaturalIdPartitioner).

    ``held_out``: the test rows were taken from these ids' rows first.
    """
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    n, col = cfg["num-clients"], cfg["partition.id-column"]
    part = NaturalIdPartitioner(partition_by="id")
    part.dataset = datasets.Dataset.from_dict({"id": ids.tolist(), "row": np.arange(ids.size).tolist()})
    found = part.num_partitions
    if found != n:
        share = cfg["problem.test-fraction"]
        held = f" (after problem.test-fraction={share!r} held out rows)" if held_out and share > 0 else ""
        raise ConfigError(
            f"num-clients must equal the {found} distinct values of partition.id-column {col!r} in the "
            f"{ids.size} training rows of problem.dataset={src!r}{held} (natural-id: one client per id), got {n}"
        )
    # Its progress bar (tqdm, on stderr) says nothing a run needs.
    with contextlib.redirect_stderr(io.StringIO()):
        return [np.sort(np.asarray(part.load_partition(i)["row"], dtype=np.int64)) for i in range(n)]
