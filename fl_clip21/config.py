"""Scenario files: the schema of every key, loading, ``--set`` overrides, checks.

A scenario is a TOML file. Top-level keys configure the run; ``[problem]`` and
``[partition]`` tables configure the data. Internally a scenario is a flat
dict of dotted keys (``problem.centers``), the same names ``--set`` takes.
Every check runs before anything starts and raises :class:`ConfigError`
naming the key and the value.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_clip21.algorithms import ALGORITHMS, DP_FEDAVG, FLOWER_BASELINES, HYPER_KEYS, MESSAGE_NORM_CAP


class ConfigError(ValueError):
    """A scenario key has a value the run cannot use."""


@dataclass(frozen=True)
class Key:
    """One scenario key: its type, default and rule."""

    kind: str  # "int" | "float" | "str" | "list" | "bool" | "path-or-list"
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns the broken rule, or None


def _show(x: int | float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _at_least(lo: int | float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {_show(lo)}"


def _at_most(hi: int | float) -> Callable[[Any], str | None]:
    return lambda v: None if v <= hi else f"must be <= {_show(hi)}"


def _rules(*checks: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """The first rule of ``checks`` that the value breaks, or None."""
    return lambda v: next((rule for check in checks if (rule := check(v))), None)


def _fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _algorithms(v: Any) -> str | None:
    if not v:
        return "must name at least one algorithm"
    known = [*ALGORITHMS, *FLOWER_BASELINES]
    unknown = [a for a in v if a not in known]
    if unknown:
        return f"has unknown algorithm {unknown[0]!r}; known: {', '.join(sorted(known))}"
    if len(set(v)) != len(v):
        return "names an algorithm twice"
    return None


def _topk(v: Any) -> str | None:
    if v <= 0:
        return "must be > 0"
    if v >= 1 and v != int(v):
        return "must be a whole count >= 1 or a fraction in (0, 1)"
    return None


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _unit_interval(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _each(check: Callable[[Any], str | None], what: str) -> Callable[[Any], str | None]:
    """A rule for a list key: not empty, no value twice, every value passes ``check``."""

    def rule(values: Any) -> str | None:
        if not values:
            return f"must list at least one {what}"
        if len(set(values)) != len(values):
            return f"must not repeat a {what}"
        return next((f"has {_show(x)}: each {broken}" for x in values if (broken := check(x))), None)

    return rule


def _column(v: Any) -> str | None:
    return None if v.strip() and "," not in v else "must name one column (not empty, no ',')"


def _columns(v: Any) -> str | None:
    """A comma-separated list of column names, or empty."""
    names = [c.strip() for c in v.split(",")] if v.strip() else []
    if "" in names:
        return "must be column names separated by ',' (no empty name), or empty"
    if len(set(names)) != len(names):
        return "must not name a column twice"
    return None


def _file_name(v: Any) -> str | None:
    # The name is the folder results/NAME: one plain path component, on any OS.
    if v in ("", ".", "..") or any(c in v for c in "/\\\0"):
        return "must be a plain file name (not empty, '.' or '..', no '/', '\\' or NUL)"
    return None


def _num_gpus(v: Any) -> str | None:
    if v < 0:
        return "must be >= 0"
    if 0 < v < MIN_GPUS:
        return f"must be 0 or >= {MIN_GPUS:g}"
    return _at_most(MAX_RESOURCES)(v)


# Bounds on a run's scales and length. A round moves the model by at most lr times a
# message bound (tau, or message-norm-cap where nothing clips), so within MAX_ROUNDS
# rounds the model and its squared norm stay inside float64's range.
MAX_LR = 1e6
MAX_SCALE = 1e12  # tau, sigma, message-norm-cap
MAX_ROUNDS = 10**6
MAX_LOCAL_STEPS = 10**4
MAX_SECONDS = 86400.0  # a day (straggler-delay, round-timeout): time.sleep overflows on huge values
MAX_DATA_SCALE = 1e6  # problem.spread, problem.reg
MAX_CLIENTS = 10**6
MAX_DIM = 10**8
MAX_ROWS = 10**7
MAX_FEATURES = 10**6
MAX_HIDDEN = 10**6
# The work of one algorithm's run: rounds x clients asked a round x (d + WORK_OVERHEAD), client-coordinate
# updates plus each client-round's fixed cost (the batched engine: 0.9 us a client-round at d = 31, 146 us
# at d = 10,001; README, "The batched engine"). MAX_WORK is 4 to 8 hours there at those rates, days on
# Flower's engine: beyond it a run is a typo (rounds and num-clients both at their bounds) or a job for a cluster.
MAX_WORK = 1e12
WORK_OVERHEAD = 32
# scikit-learn's random_state (make_classification, train_test_split) takes seeds below 2**32.
MAX_SEED = 2**32 - 1
# Ray starts about CPUs / num-cpus actors: at most 10 per CPU, and 100 clients per GPU.
MIN_CPUS = 0.1
MIN_GPUS = 0.01
MAX_RESOURCES = 1e4
# Below 0.001 the accountant's root finder takes tens of seconds; above 1000, epsilon means nothing.
EPSILON_RANGE = (1e-3, 1e3)
# Below this noise multiplier sigma / (2 tau) the accountant's epsilon leaves the float range.
MIN_NOISE_MULTIPLIER = 1e-6
INT64 = (-(2**63), 2**63 - 1)


# Relative client data sizes (flwr-datasets' size partitioners; "equal": the partition kind's own).
PARTITION_SIZES = ("equal", "even", "linear", "square", "exponential")


# SuperNode node-config keys: the folder where this node keeps the scenario's data files,
# and the modules (or packages) whose plug-in problems it runs.
DATA_DIR = "data-dir"
PLUGIN_MODULES = "plugin-modules"

PLUGINS_ARE_CODE = (
    'Plug-ins are code: problem.name = "module.path:factory" imports module.path and runs\n'
    "factory(scenario), in the driver and in every SuperNode the run reaches. A SuperNode runs\n"
    "whatever problem and data-file paths the server's scenario names unless its node config\n"
    f"restricts them: {DATA_DIR}=DIR opens the scenario's data files by file name in DIR only;\n"
    f"{PLUGIN_MODULES}=MOD,PKG runs plug-ins from those modules (and the modules under them) only."
)

SCHEMA: dict[str, Key] = {
    "name": Key("str", "scenario", "Scenario name, used in titles and as the folder results/NAME.", _file_name),
    "algorithms": Key("list", ["gd", "clip-gd", "clip21-gd"], "Algorithms to run, comma-separated.", _algorithms),
    "rounds": Key("int", 100, f"Communication rounds per algorithm (at most {MAX_ROUNDS}).", _rules(_at_least(1), _at_most(MAX_ROUNDS))),
    "lr": Key("float", 0.1, f"Server step size gamma (at most {MAX_LR:g}).", _rules(_positive, _at_most(MAX_LR))),
    "tau": Key("float", 1.0, f"Clipping threshold tau (at most {MAX_SCALE:g}).", _rules(_positive, _at_most(MAX_SCALE))),
    "seed": Key("int", 0, f"Seed of data split, model init, sampling and minibatches (0 to {MAX_SEED}).", _rules(_at_least(0), _at_most(MAX_SEED))),
    "num-clients": Key("int", 10, f"Number of clients n (at most {MAX_CLIENTS}).", _rules(_at_least(1), _at_most(MAX_CLIENTS))),
    "fraction": Key("float", 1.0, "Share of clients sampled per round (partial participation).", _fraction),
    "batch-size": Key("int", 32, "Minibatch size of the stochastic algorithms (*-sgd).", _at_least(1)),
    "target": Key("float", 1e-8, "grad_norm_sq target for 'rounds to target'.", _positive),
    "seeds": Key("ints", None, "Run once per seed (comma-separated, distinct); the summary averages over them.", _each(_rules(_at_least(0), _at_most(MAX_SEED)), "seed")),
    "audit": Key("bool", False, "Clients also report v_i so the server checks g == mean(v_i) each round."),
    "num-cpus": Key("float", 1.0, f"CPUs reserved per simulated client (Ray; {MIN_CPUS:g} to {MAX_RESOURCES:g}).", _rules(_at_least(MIN_CPUS), _at_most(MAX_RESOURCES))),
    "num-gpus": Key("float", 0.0, f"GPUs reserved per simulated client (Ray; 0, or {MIN_GPUS:g} to {MAX_RESOURCES:g}: a fraction shares a GPU).", _num_gpus),
    "beta1": Key("float", 1.0, "clip21-sgd2m: client momentum beta1.", lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    "beta2": Key("float", 1.0, "clip21-sgd2m: error-feedback step beta2.", lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    "sigma": Key("float", 0.0, f"Std of the Gaussian noise, in units where the clipping bound is tau: added by each client after clipping (dp=local: clip-*, clip21-sgd2m) or by the server to the sum of the clipped messages (dp=central; and the DP-FedAvg baselines, which under dp=local get sigma / 2); 0, or sigma / (2 tau) >= {MIN_NOISE_MULTIPLIER:g}; at most {MAX_SCALE:g}.", _rules(_non_negative, _at_most(MAX_SCALE))),
    "delta": Key("float", 1e-5, "delta of the reported (epsilon, delta) DP.", lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
    "dp": Key("str", "local", "Where the DP noise is added: local (every client noises its message: clip-gd/sgd, clip21-sgd2m) or central (the server noises the sum of the clipped messages: clip-gd/sgd, clip21-gd/sgd, clip21-sgd2m, clip21-topk, dp-fedavg, dp-fedavg-adaptive, flower-dp-*; user-level DP against everyone but the server).", _one_of("local", "central")),
    "sampling": Key("str", "fixed", "Client sampling: fixed (round(fraction x n) clients a round; with fewer than n, central DP is accounted under replace-one adjacency, noise multiplier halved, no amplification) or poisson (each client with probability fraction; central DP's accountant then uses amplification by subsampling; not for flower-dp-*).", _one_of("fixed", "poisson")),
    "secure-noise": Key("bool", False, "Draw the DP noise (the clients' local noise on the clients; the server's central noise and Poisson sampling on the server) from OS entropy instead of the seed every client receives. Deployments must set it: with seeded noise the server can subtract local noise and any client the central noise. The run is then not reproducible."),
    "target-quantile": Key("float", 0.5, "dp-fedavg-adaptive, flower-dp-adaptive: the fraction of updates the adaptive clipping norm aims to leave unclipped (Andrew et al.'s gamma).", _unit_interval),
    "clip-lr": Key("float", 0.2, "dp-fedavg-adaptive, flower-dp-adaptive: step of the clipping norm's geometric update, C <- C exp(-clip-lr (unclipped fraction - target-quantile)).", _rules(_positive, _at_most(MAX_LR))),
    "count-stddev": Key("float", 0.0, "dp-fedavg-adaptive, flower-dp-adaptive under DP: std of the noise on the count of unclipped updates (0: the clients a round / 20); must exceed z / 2.", _rules(_non_negative, _at_most(MAX_SCALE))),
    "target-epsilon": Key("floats", None, f"Calibrate sigma to these epsilons over all rounds (comma-separated, distinct, each in [{EPSILON_RANGE[0]:g}, {EPSILON_RANGE[1]:g}]: a grid).", _each(_rules(_at_least(EPSILON_RANGE[0]), _at_most(EPSILON_RANGE[1])), "epsilon")),
    "topk": Key("float", 0.1, "ef21-topk / clip21-topk: k as a count (>= 1) or a fraction of the model (< 1).", _topk),
    "local-steps": Key("int", 1, f"celgc, dp-fedavg*, flower-dp-*: local steps per round (at most {MAX_LOCAL_STEPS}).", _rules(_at_least(1), _at_most(MAX_LOCAL_STEPS))),
    "message-norm-cap": Key("float", MESSAGE_NORM_CAP, f"gd, sgd, server-clip-gd, ef21-topk: the largest global norm a message of an algorithm without a clipping bound may have; the server rejects larger ones (at most {MAX_SCALE:g}).", _rules(_positive, _at_most(MAX_SCALE))),
    "availability": Key("float", 1.0, "Probability that a client is online in a round (seeded); rounds sample among online clients.", _fraction),
    "straggler-fraction": Key("float", 0.0, "Probability that a sampled client is slow in a round (seeded).", _unit_interval),
    "straggler-delay": Key("float", 0.0, f"Seconds a slow client's reply comes late (at most {MAX_SECONDS:g}).", _rules(_non_negative, _at_most(MAX_SECONDS))),
    "round-timeout": Key("float", 0.0, f"Seconds the server waits for replies; later ones are dropped (0: up to an hour; at most {MAX_SECONDS:g}).", _rules(_non_negative, _at_most(MAX_SECONDS))),
    "device": Key("str", "numpy", "Where the batched engine (--engine vectorized, sweep, tune) computes: numpy, or torch on cpu or cuda (the same trajectories to float rounding; the Flower engine always computes on numpy).", _one_of("numpy", "cpu", "cuda")),
    "problem.name": Key("str", "mean-estimation", "mean-estimation | logreg | mlp | cnn1d | module.path:factory (a plug-in runs code: see below)."),
    "problem.centers": Key("path-or-list", None, "mean-estimation: .npy file (n x d, real numbers) or inline list; unset: drawn from seed."),
    "problem.dim": Key("int", 10, f"mean-estimation: dimension when centres are drawn (at most {MAX_DIM}).", _rules(_at_least(1), _at_most(MAX_DIM))),
    "problem.spread": Key("float", 1.0, f"mean-estimation: std of drawn centres (at most {MAX_DATA_SCALE:g}).", _rules(_positive, _at_most(MAX_DATA_SCALE))),
    "problem.dataset": Key("str", "breast_cancer", "logreg: breast_cancer, synthetic or a LibSVM file path; mlp and cnn1d: digits or mnist1d (generated offline by the mnist1d package, problem.rows rows seeded by seed); all three: a dataset table, i.e. a .parquet or .csv file, a folder of parquet files or one saved by datasets' save_to_disk, or a Hugging Face Hub dataset owner/name (see the problem.*-column keys)."),
    "problem.features-column": Key("str", "", "Dataset table: the feature columns, comma-separated, each a number or a fixed-length list of numbers per row (concatenated in this order); empty: every column but problem.label-column and partition.id-column.", _columns),
    "problem.label-column": Key("str", "label", "Dataset table: the column of class labels (numbers, bools or strings; logreg: 2 classes, mlp: at least 2).", _column),
    "problem.split": Key("str", "train", "Dataset table: the split the clients train on (a single file or saved Dataset is split 'train').", _column),
    "problem.test-split": Key("str", "", "mlp, cnn1d on a dataset table: the split of the test accuracy; empty: problem.test-fraction of problem.split is held out.", lambda v: None if not v else _column(v)),
    "problem.rows": Key("int", 20000, f"Rows generated, seeded by seed: logreg on synthetic data (scikit-learn's make_classification), mlp and cnn1d on mnist1d (the mnist1d package's generator, about 0.2 ms a row; test rows held out of them); at most {MAX_ROWS}.", _rules(_at_least(1), _at_most(MAX_ROWS))),
    "problem.features": Key("int", 30, f"logreg on synthetic data: features (the model has one more, the bias; at most {MAX_FEATURES}).", _rules(_at_least(1), _at_most(MAX_FEATURES))),
    "problem.reg": Key("float", 0.1, f"logreg: lambda of the non-convex regulariser (at most {MAX_DATA_SCALE:g}).", _rules(_non_negative, _at_most(MAX_DATA_SCALE))),
    "problem.hidden": Key("int", 32, f"mlp: hidden units (at most {MAX_HIDDEN}).", _rules(_at_least(1), _at_most(MAX_HIDDEN))),
    "problem.channels": Key("int", 16, f"cnn1d: channels of its two convolutions (16: d = 1562 on mnist1d, about the mlp's at hidden = 32; at most {MAX_HIDDEN}).", _rules(_at_least(1), _at_most(MAX_HIDDEN))),
    "problem.test-fraction": Key("float", 0.2, "mlp, cnn1d: share of rows held out for test accuracy.", lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
    "partition.kind": Key("str", "iid", "iid | dirichlet | label-sorted | pathological | natural-id (a dataset table's partition.id-column).", _one_of("iid", "dirichlet", "label-sorted", "pathological", "natural-id")),
    "partition.alpha": Key("float", 0.5, "dirichlet: concentration alpha.", _positive),
    "partition.classes-per-client": Key("int", 2, "pathological: classes per client.", _at_least(1)),
    "partition.id-column": Key("str", "", "natural-id: the column of client ids (e.g. FEMNIST's writer_id); one client per distinct id, so num-clients must equal their number.", lambda v: None if not v else _column(v)),
    "partition.sizes": Key("str", "equal", "Client data sizes: equal (the partition's own: iid equal sizes, dirichlet each class split among the clients in Dirichlet(alpha) shares, which fails when a client would get no row), even (rows / num-clients each; dirichlet: each client's class mix drawn from Dirichlet(alpha), at any number of clients), or client i gets a share ~ i+1 (linear), (i+1)^2 (square), e^(i+1) (exponential).", _one_of(*PARTITION_SIZES)),
}

_BUILTIN_PROBLEMS = ("mean-estimation", "logreg", "mlp", "cnn1d")
BUILTIN_DATASETS = ("breast_cancer", "digits", "synthetic", "mnist1d")  # problem.dataset values that are not files


# An integer written in --set text: digits, an optional sign, TOML's underscores.
_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*")


def _int(item: Any, from_text: bool) -> int | None:
    """``item`` as an int64, or None: no bools, no floats (not even 3.0), no truncation."""
    if from_text:
        text = str(item).strip()
        value = int(text) if _INT_TEXT.fullmatch(text) else None
    else:
        value = item if isinstance(item, int) and not isinstance(item, bool) else None
    return value if value is not None and INT64[0] <= value <= INT64[1] else None


def _float(item: Any, from_text: bool) -> float | None:
    """``item`` as a float (inf for an integer beyond float64), or None: no bools, no text from a TOML file."""
    if not from_text and (isinstance(item, bool) or not isinstance(item, (int, float))):
        return None
    try:
        return float(str(item).strip()) if from_text else float(item)
    except ValueError:
        return None
    except OverflowError:
        return math.inf


def _items(value: Any, from_text: bool) -> tuple[list[Any], bool]:
    """The items of a list key, and whether they are text (from --set or a comma-separated string)."""
    if from_text or isinstance(value, str):
        return [x for x in str(value).split(",") if x.strip()], True
    return (list(value) if isinstance(value, list) else [value]), False


def _json_value(v: Any) -> bool:
    """Whether ``v`` is made of str, int, float, bool, lists and tables (what a scenario's JSON can carry)."""
    if isinstance(v, (str, int, float)):
        return True
    if isinstance(v, list):
        return all(_json_value(x) for x in v)
    return isinstance(v, dict) and all(isinstance(k, str) and _json_value(x) for k, x in v.items())


def _coerce(key: str, spec: Key, value: Any, from_text: bool) -> Any:
    """Convert ``value`` to the key's type, or raise naming key and value."""

    def bad(rule: str) -> ConfigError:
        return ConfigError(f"{key} {rule}, got {value!r}")

    kind = spec.kind
    if kind == "int":
        out = _int(value, from_text)
        if out is None:
            raise bad("must be an integer (a whole number in 64 bits, not a float or a bool)")
        return out
    if kind == "float":
        out = _float(value, from_text)
        if out is None:
            raise bad("must be a number (not a bool)")
        if not math.isfinite(out):
            raise bad("must be finite")
        return out
    if kind == "bool":
        if from_text:
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise bad("must be true or false")
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if kind == "list":
        if from_text:
            return [s.strip() for s in str(value).split(",") if s.strip()]
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise bad("must be a list of names")
        return list(value)
    if kind in ("ints", "floats"):
        items, text = _items(value, from_text)
        out = [(_int if kind == "ints" else _float)(x, text) for x in items]
        if any(x is None for x in out):
            raise bad(
                "must be integers (whole numbers in 64 bits, not floats or bools)" if kind == "ints"
                else "must be numbers (not bools)"
            )
        if not all(math.isfinite(x) for x in out):
            raise bad("must be finite")
        return out
    if kind == "path-or-list":
        if value is None or isinstance(value, (str, list)):
            return value
        raise bad("must be a file path or a list of rows")
    if not isinstance(value, str):
        raise bad("must be a string")
    return value


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"problem": {"dim": 3}}`` -> ``{"problem.dim": 3}``."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def _plugin_problem(flat: Mapping[str, Any]) -> bool:
    return ":" in str(flat.get("problem.name", ""))


def plugin_parts(name: str) -> tuple[str, str] | None:
    """``("module.path", "factory")`` of a plug-in problem name, or None if ``name`` is not one."""
    module, sep, attr = name.partition(":")
    if not sep or not attr.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        return None
    return module, attr


def _adds_noise(name: str, dp: str) -> bool:
    """Whether algorithm ``name`` adds the noise ``sigma`` under ``dp`` (local or central)."""
    from fl_clip21.algorithms import CENTRAL_DP

    if name in DP_FEDAVG:  # central DP in either mode
        return True
    return name in CENTRAL_DP if dp == "central" else "sigma" in HYPER_KEYS.get(name, ())


def _noisy(cfg: Mapping[str, Any]) -> bool:
    """Whether an algorithm of ``cfg`` adds the Gaussian noise ``sigma`` (and reports epsilon)."""
    return any(_adds_noise(a, cfg["dp"]) for a in cfg["algorithms"])


def _check_private(cfg: Mapping[str, Any]) -> None:
    """A run asked to be private (sigma > 0 or target-epsilon) has no algorithm that ignores it.

    ``secure-noise`` is refused where there is no noise to draw.
    """
    asked = [f"sigma={cfg['sigma']!r}"] if cfg["sigma"] > 0 else []
    asked += [f"target-epsilon={cfg['target-epsilon']!r}"] if cfg["target-epsilon"] else []
    if not asked:
        if cfg["secure-noise"]:
            raise ConfigError(
                "secure-noise=true draws the DP noise from OS entropy, but this run adds no noise (sigma=0, no "
                "target-epsilon): set sigma or target-epsilon, or secure-noise=false"
            )
        return
    for name in cfg["algorithms"]:
        if not _adds_noise(name, cfg["dp"]):
            other = "central" if cfg["dp"] == "local" else "local"
            hint = f" (it does with dp={other})" if _adds_noise(name, other) else ""
            raise ConfigError(
                f"algorithms: {name} adds no noise with dp={cfg['dp']}{hint}, so {' and '.join(asked)} would not "
                f"make it private: drop it from algorithms or from the private run"
            )


def _check_noise(cfg: Mapping[str, Any]) -> None:
    if cfg["sigma"] > 0 and _noisy(cfg) and cfg["sigma"] / (2 * cfg["tau"]) < MIN_NOISE_MULTIPLIER:
        raise ConfigError(
            f"sigma must be 0 or >= {2 * MIN_NOISE_MULTIPLIER:g} * tau (a noise multiplier sigma / (2 tau) "
            f">= {MIN_NOISE_MULTIPLIER:g}, below which epsilon is beyond the float range), "
            f"got sigma={cfg['sigma']!r} with tau={cfg['tau']!r}"
        )


def resolve(
    scenario: Mapping[str, Any],
    overrides: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Defaults + scenario + ``--set`` overrides, typed and checked.

    Relative paths in ``problem.centers`` and ``problem.dataset`` are taken
    relative to ``base_dir`` (the scenario's folder) and made absolute.
    """
    flat = flatten(scenario)
    overrides = dict(overrides or {})
    plugin = _plugin_problem({**flat, **overrides})
    cfg: dict[str, Any] = {k: spec.default for k, spec in SCHEMA.items()}
    for source, from_text in ((flat, False), (overrides, True)):
        for key, value in source.items():
            spec = SCHEMA.get(key)
            if spec is None:
                if plugin and key.startswith("problem."):
                    if not _json_value(value):
                        raise ConfigError(
                            f"{key} must be a string, number, bool, list or table, got {value!r}"
                        )
                    cfg[key] = value
                    continue
                raise ConfigError(
                    f"unknown key {key!r} (value {value!r}); run 'fl-clip21 run --help' for the keys"
                )
            cfg[key] = _coerce(key, spec, value, from_text)
    for key, spec in SCHEMA.items():
        if spec.check is not None and cfg[key] is not None:
            rule = spec.check(cfg[key])
            if rule:
                raise ConfigError(f"{key} {rule}, got {cfg[key]!r}")
    name = cfg["problem.name"]
    if name not in _BUILTIN_PROBLEMS and plugin_parts(name) is None:
        raise ConfigError(
            f"problem.name must be one of {', '.join(_BUILTIN_PROBLEMS)} or 'module.path:factory' "
            f"(Python identifiers), got {name!r}"
        )
    _check_noise(cfg)
    _check_device(cfg)
    _check_private(cfg)
    _check_heterogeneity(cfg)
    _check_table_keys(cfg)
    if base_dir is not None:
        for key, v in data_files(cfg, base_dir).items():
            p = Path(v).expanduser()
            cfg[key] = str(p if p.is_absolute() else (base_dir / p).resolve())
    return cfg


def check_work(cfg: Mapping[str, Any], d: int) -> None:
    """Refuse a run longer than :data:`MAX_WORK` (a :class:`ConfigError` naming the keys and values).

    ``d`` is the model's number of entries (known once the problem is built);
    the clients asked a round are ``fraction`` x ``num-clients`` (at least one).
    """
    n, rounds, fraction = cfg["num-clients"], cfg["rounds"], cfg["fraction"]
    asked = max(1, round(fraction * n))
    work = rounds * asked * (d + WORK_OVERHEAD)
    if work > MAX_WORK:
        share = f" x fraction={fraction:g}" if fraction < 1 else ""
        raise ConfigError(
            f"rounds={rounds} x num-clients={n}{share} x (d={d} + {WORK_OVERHEAD}) = {work:.3g} client-coordinate "
            f"updates per algorithm, more than {MAX_WORK:g} (hours on the batched engine, days on Flower's): "
            "lower rounds, num-clients or fraction, or the model's size"
        )


def _check_device(cfg: Mapping[str, Any]) -> None:
    """``device=cuda`` needs a GPU torch can use; say so before anything runs."""
    if cfg["device"] == "cuda":
        from fl_clip21.backend import cuda_problem

        why = cuda_problem()
        if why:
            raise ConfigError(f"device='cuda' needs a CUDA GPU, but {why}; use device=cpu or device=numpy")


def _check_table_keys(cfg: dict[str, Any]) -> None:
    """Rules that tie the dataset-table keys to each other."""
    label = cfg["problem.label-column"]
    if label in [c.strip() for c in cfg["problem.features-column"].split(",")]:
        raise ConfigError(
            f"problem.features-column must not include problem.label-column {label!r}, "
            f"got {cfg['problem.features-column']!r}"
        )
    if cfg["problem.test-split"] == cfg["problem.split"]:
        raise ConfigError(
            f"problem.test-split must differ from problem.split (or be empty: problem.test-fraction is held out), "
            f"got {cfg['problem.test-split']!r}"
        )
    if cfg["partition.kind"] == "natural-id" and not cfg["partition.id-column"]:
        raise ConfigError(
            "partition.id-column must name the column of client ids when partition.kind is 'natural-id', got ''"
        )


# Scenario keys that may name a data file, and the values that name built-in data instead.
DATA_FILE_KEYS = ("problem.centers", "problem.dataset")

# A Hugging Face Hub dataset id, as FederatedDataset(dataset=...) takes it: owner/name.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# Dataset tables read by file name: their suffix makes a value a path even when the file is missing.
TABLE_SUFFIXES = (".parquet", ".csv")


def hub_dataset(value: str, base_dir: Path | None = None) -> bool:
    """Whether a ``problem.dataset`` value names a Hugging Face Hub dataset rather than local data.

    It does when it reads ``owner/name`` (no ``..``, no ``.parquet`` or ``.csv``
    suffix) and no file or folder has that path, relative to ``base_dir`` (the
    scenario's folder) or else to the working directory.
    """
    if not _HUB_ID.fullmatch(value) or ".." in value or value.lower().endswith(TABLE_SUFFIXES):
        return False
    return not ((base_dir or Path()) / value).exists()


def data_files(cfg: Mapping[str, Any], base_dir: Path | None = None) -> dict[str, str]:
    """The data files a scenario names: ``{key: path}`` for ``problem.centers`` / ``problem.dataset``.

    A path may be a folder (a dataset table's); a Hub dataset name
    (:func:`hub_dataset`, relative paths taken from ``base_dir``) is no data file.
    """
    out = {}
    for key in DATA_FILE_KEYS:
        v = cfg.get(key)
        if isinstance(v, str) and v and v not in BUILTIN_DATASETS:
            if key == "problem.dataset" and hub_dataset(v, base_dir):
                continue
            out[key] = v
    return out


def with_data_dir(cfg: dict[str, Any], data_dir: Any) -> dict[str, Any]:
    """``cfg`` with its data files looked up in a node's ``data-dir``, by file name.

    The rule: a node whose ``data-dir`` is D opens ``D/<file name>`` for every data
    file of the scenario (``problem.centers = "/srv/a/centers.npy"`` ->
    ``D/centers.npy``; a dataset folder ``/srv/a/femnist`` -> the folder
    ``D/femnist``), and nothing else; a node without ``data-dir`` (None or "")
    opens the path the scenario gives. A Hub dataset name is no data file: every
    node loads it itself. A file missing from D is a :class:`ConfigError` naming
    the key, the path tried and D.
    """
    if data_dir is None or data_dir == "":
        return cfg
    folder = Path(str(data_dir)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"node config {DATA_DIR} must be an existing folder, got {str(data_dir)!r}")
    out = dict(cfg)
    for key, path in data_files(cfg).items():
        local = folder / Path(path).name
        if not local.exists():
            raise ConfigError(
                f"{key}: {str(local)!r} not found (the scenario names {path!r}; this node's "
                f"{DATA_DIR} is {str(data_dir)!r} and data files are looked up there by file name)"
            )
        out[key] = str(local)
    return out


def _allowed_plugin_modules(value: Any) -> tuple[str, ...]:
    """The modules a node's ``plugin-modules`` value names (empty: the key is unset)."""
    if value is None or value == "":
        return ()
    modules = tuple(m.strip() for m in str(value).split(","))
    if not all(m and all(part.isidentifier() for part in m.split(".")) for m in modules):
        raise ConfigError(
            f"node config {PLUGIN_MODULES} must be comma-separated module names (a.b,c), got {str(value)!r}"
        )
    return modules


def with_node_config(cfg: dict[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` as a SuperNode with ``node_config`` runs it: the node's two restrictions applied.

    - ``plugin-modules`` (comma-separated module names): when set, a plug-in
      problem from a module that is neither one of them nor under one of them
      (``pkg`` allows ``pkg`` and ``pkg.sub``) is a :class:`ConfigError`, raised
      before anything is imported. Unset or empty: any plug-in runs.
    - ``data-dir``: data files are looked up there by file name (:func:`with_data_dir`).

    Parameters
    ----------
    cfg:
        The scenario the server sent (not changed).
    node_config:
        The node's config (Flower's ``context.node_config``); other keys are ignored.
    """
    allowed = _allowed_plugin_modules(node_config.get(PLUGIN_MODULES))
    name = str(cfg.get("problem.name", ""))
    if allowed and name not in _BUILTIN_PROBLEMS:
        parts = plugin_parts(name)
        module = parts[0] if parts else name
        if not any(module == m or module.startswith(f"{m}.") for m in allowed):
            raise ConfigError(
                f"problem.name {name!r}: module {module!r} is not allowed on this node "
                f"(node config {PLUGIN_MODULES}={node_config[PLUGIN_MODULES]!r})"
            )
    return with_data_dir(cfg, node_config.get(DATA_DIR))


def _check_heterogeneity(cfg: dict[str, Any]) -> None:
    """Rules that tie the system-heterogeneity keys to other keys."""
    if cfg["straggler-fraction"] > 0 and cfg["straggler-delay"] == 0:
        raise ConfigError(
            f"straggler-delay must be > 0 when straggler-fraction > 0, got {cfg['straggler-delay']!r} "
            f"(straggler-fraction={cfg['straggler-fraction']!r})"
        )
    for name in (a for a in cfg["algorithms"] if a in FLOWER_BASELINES):
        for key, neutral in (("availability", 1.0), ("straggler-fraction", 0.0)):
            if cfg[key] != neutral:
                raise ConfigError(
                    f"{key}={cfg[key]!r} is not supported by {name} (Flower's DP strategies want every sampled "
                    f"client's reply); set {key}={neutral:g} or drop {name} from algorithms"
                )
        if cfg["sampling"] == "poisson" and cfg["fraction"] < 1:
            raise ConfigError(
                f"sampling='poisson' is not supported by {name}: Flower's DP strategies divide by the number of "
                f"replies and noise for a fixed num_sampled_clients, so a Poisson sample's amplification cannot be "
                f"claimed; set sampling=fixed, or use dp-fedavg (batched, fixed denominator) with sampling=poisson"
            )
    sizes = cfg["partition.sizes"]
    if sizes != "equal":
        if cfg["partition.kind"] in ("pathological", "natural-id"):
            raise ConfigError(
                f"partition.sizes={sizes!r} works with partition.kind iid, dirichlet or label-sorted, "
                f"got {cfg['partition.kind']!r}"
            )
        if cfg["problem.name"] == "mean-estimation":
            raise ConfigError(
                f"partition.sizes={sizes!r} needs a problem with data rows (logreg, mlp, cnn1d), "
                "got problem.name 'mean-estimation' (one centre per client)"
            )


def with_epsilon(cfg: dict[str, Any], target: float) -> dict[str, Any]:
    """``cfg`` with ``sigma`` calibrated so that every client's epsilon after all rounds is ``target``.

    Raises
    ------
    ConfigError
        Naming ``target-epsilon`` and ``target`` when it is out of range, the
        accountant cannot calibrate it, or the calibrated sigma is above its cap.
    """
    from fl_clip21.algorithms import central_sampling
    from fl_clip21.privacy import calibrate_central, calibrate_noise_multiplier

    rule = SCHEMA["target-epsilon"].check([target])
    if rule:
        raise ConfigError(f"target-epsilon {rule}, got {target!r}")
    rounds, delta = cfg["rounds"], cfg["delta"]
    try:
        if cfg.get("dp") == "central":
            # Noise on the sum, sensitivity tau (add/remove-one: sigma = z tau), or 2 tau when a fixed
            # number m < n of clients a round makes the adjacency replace-one (sigma = 2 z tau).
            _, q, replace_one = central_sampling(cfg)
            z = calibrate_central(target, rounds, delta, q) * (2 if replace_one else 1)
        else:  # noise on each message, sensitivity 2 tau: sigma = 2 z tau
            z = 2 * calibrate_noise_multiplier(target, rounds, delta)
    except (ValueError, ArithmeticError, RuntimeError) as e:
        raise ConfigError(
            f"target-epsilon={target!r} cannot be calibrated over rounds={rounds!r} at delta={delta!r} ({e})"
        ) from None
    sigma = cfg["tau"] * z
    if sigma > MAX_SCALE:
        raise ConfigError(
            f"target-epsilon={target!r} needs sigma={sigma:g} over rounds={rounds!r} with tau={cfg['tau']!r}, "
            f"but sigma must be <= {MAX_SCALE:g}: use a larger target-epsilon, fewer rounds or a smaller tau"
        )
    return {**cfg, "target-epsilon": [target], "sigma": sigma}


def expand_runs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One resolved config per (target epsilon, seed) of the scenario's grid."""
    seeds = cfg["seeds"] or [cfg["seed"]]
    epsilons = cfg["target-epsilon"] or [None]
    runs = []
    for eps in epsilons:
        base = with_epsilon(cfg, eps) if eps is not None else cfg
        check_algorithms(base)
        runs.extend({**base, "seed": s} for s in seeds)
    return runs


def check_algorithms(cfg: dict[str, Any]) -> None:
    """Build every algorithm of ``cfg`` (with its calibrated sigma): a value none can take is a ConfigError.

    Rules that tie keys to the noise (adaptive clipping's count-stddev against
    the noise multiplier) can only be checked once sigma is known.
    """
    from fl_clip21.algorithms import adaptive_noise, algorithm_from_config, central_sampling, server_sigma

    for name in cfg["algorithms"]:
        try:
            if name in ALGORITHMS:
                algorithm_from_config(name, cfg)
            elif name == "flower-dp-adaptive" and cfg["sigma"] > 0:
                adaptive_noise(server_sigma(cfg) / cfg["tau"], cfg["count-stddev"] or central_sampling(cfg)[0] / 20)
        except ValueError as e:
            raise ConfigError(f"algorithms: {name}: {e}") from None


def load_scenario(path: str | Path, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read a scenario TOML file (UTF-8) and resolve it (see :func:`resolve`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"scenario file not found: {str(p)!r}")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"scenario {str(p)!r} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"scenario {str(p)!r} is not UTF-8 text (TOML): byte {e.object[e.start]:#04x} at offset {e.start}"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"scenario {str(p)!r} is not valid TOML: {e}") from None
    return resolve(data, overrides, base_dir=p.parent.resolve())


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["tau=0.5", ...]`` -> ``{"tau": "0.5"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _help_value(value: Any) -> str:
    """A key's value as ``--set`` would take it: lists comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def keys_help(cfg: Mapping[str, Any] | None = None) -> str:
    """One line per key, for ``fl-clip21 run --help``, then what a plug-in problem may do.

    Without ``cfg`` each line ends with the key's built-in default. With a
    resolved scenario ``cfg`` it ends with the scenario's value; a line whose
    value differs from the built-in default starts with ``*`` and names both.
    A plug-in problem's own ``problem.*`` keys follow the schema's.
    """
    lines = []
    for k, spec in SCHEMA.items():
        default = _help_value(spec.default)
        if cfg is None:
            lines.append(f"  {k:<30} {spec.help} [default: {default}]")
        elif cfg[k] == spec.default:
            lines.append(f"  {k:<30} {spec.help} [{default}, the default]")
        else:
            lines.append(f"* {k:<30} {spec.help} [{_help_value(cfg[k])}; default: {default}]")
    for k in sorted(set(cfg or {}) - set(SCHEMA)):
        lines.append(f"* {k:<30} A key of the plug-in problem. [{_help_value(cfg[k])}]")
    return "\n".join(lines) + "\n\n" + PLUGINS_ARE_CODE
