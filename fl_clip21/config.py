"""Scenario files: the schema of every key, loading, ``--set`` overrides, checks.

A scenario is a TOML file. Top-level keys configure the run; ``[problem]`` and
``[partition]`` tables configure the data. Internally a scenario is a flat
dict of dotted keys (``problem.centers``), the same names ``--set`` takes.
Every check runs before anything starts and raises :class:`ConfigError`
naming the key and the value.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_clip21.algorithms import ALGORITHMS, FLOWER_BASELINES, MESSAGE_NORM_CAP


class ConfigError(ValueError):
    """A scenario key has a value the run cannot use."""


@dataclass(frozen=True)
class Key:
    """One scenario key: its type, default and rule."""

    kind: str  # "int" | "float" | "str" | "list" | "bool" | "path-or-list"
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns the broken rule, or None


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _at_least(lo: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}"


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


# Relative client data sizes (flwr-datasets' size partitioners; "equal": the partition kind's own).
PARTITION_SIZES = ("equal", "linear", "square", "exponential")


SCHEMA: dict[str, Key] = {
    "name": Key("str", "scenario", "Scenario name, used in titles."),
    "algorithms": Key("list", ["gd", "clip-gd", "clip21-gd"], "Algorithms to run, comma-separated.", _algorithms),
    "rounds": Key("int", 100, "Communication rounds per algorithm.", _at_least(1)),
    "lr": Key("float", 0.1, "Server step size gamma.", _positive),
    "tau": Key("float", 1.0, "Clipping threshold tau.", _positive),
    "seed": Key("int", 0, "Seed of data split, model init, sampling and minibatches.", _at_least(0)),
    "num-clients": Key("int", 10, "Number of clients n.", _at_least(1)),
    "fraction": Key("float", 1.0, "Share of clients sampled per round (partial participation).", _fraction),
    "batch-size": Key("int", 32, "Minibatch size of the stochastic algorithms (*-sgd).", _at_least(1)),
    "target": Key("float", 1e-8, "grad_norm_sq target for 'rounds to target'.", _positive),
    "seeds": Key("ints", None, "Run once per seed (comma-separated); the summary averages over them.", lambda v: None if v and all(x >= 0 for x in v) else "must be integers >= 0"),
    "audit": Key("bool", False, "Clients also report v_i so the server checks g == mean(v_i) each round."),
    "num-cpus": Key("float", 1.0, "CPUs reserved per simulated client (Ray).", _positive),
    "num-gpus": Key("float", 0.0, "GPUs reserved per simulated client (Ray; a fraction shares a GPU).", lambda v: None if v >= 0 else "must be >= 0"),
    "beta1": Key("float", 1.0, "clip21-sgd2m: client momentum beta1.", lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    "beta2": Key("float", 1.0, "clip21-sgd2m: error-feedback step beta2.", lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    "sigma": Key("float", 0.0, "Std of the Gaussian noise clients add after clipping (clip-*, clip21-sgd2m, flower-dp-fixed).", lambda v: None if v >= 0 else "must be >= 0"),
    "delta": Key("float", 1e-5, "delta of the reported (epsilon, delta) local DP.", lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
    "target-epsilon": Key("floats", None, "Calibrate sigma to these epsilons over all rounds (comma-separated: a grid).", lambda v: None if v and all(e > 0 for e in v) else "must be numbers > 0"),
    "topk": Key("float", 0.1, "ef21-topk / clip21-topk: k as a count (>= 1) or a fraction of the model (< 1).", _topk),
    "local-steps": Key("int", 1, "celgc, flower-dp-fixed: local steps per round.", _at_least(1)),
    "message-norm-cap": Key("float", MESSAGE_NORM_CAP, "gd, sgd, server-clip-gd, ef21-topk: the largest global norm a message of an algorithm without a clipping bound may have; the server rejects larger ones.", _positive),
    "availability": Key("float", 1.0, "Probability that a client is online in a round (seeded); rounds sample among online clients.", _fraction),
    "straggler-fraction": Key("float", 0.0, "Probability that a sampled client is slow in a round (seeded).", _unit_interval),
    "straggler-delay": Key("float", 0.0, "Seconds a slow client's reply comes late.", _non_negative),
    "round-timeout": Key("float", 0.0, "Seconds the server waits for replies; later ones are dropped (0: up to an hour).", _non_negative),
    "problem.name": Key("str", "mean-estimation", "mean-estimation | logreg | mlp | module:factory."),
    "problem.centers": Key("path-or-list", None, "mean-estimation: .npy file (n x d) or inline list; unset: drawn from seed."),
    "problem.dim": Key("int", 10, "mean-estimation: dimension when centres are drawn.", _at_least(1)),
    "problem.spread": Key("float", 1.0, "mean-estimation: std of drawn centres.", _positive),
    "problem.dataset": Key("str", "breast_cancer", "logreg: breast_cancer, synthetic or a LibSVM file path; mlp: digits."),
    "problem.rows": Key("int", 20000, "logreg on synthetic data: rows (scikit-learn's make_classification, seeded by seed).", _at_least(1)),
    "problem.features": Key("int", 30, "logreg on synthetic data: features (the model has one more, the bias).", _at_least(1)),
    "problem.reg": Key("float", 0.1, "logreg: lambda of the non-convex regulariser.", lambda v: None if v >= 0 else "must be >= 0"),
    "problem.hidden": Key("int", 32, "mlp: hidden units.", _at_least(1)),
    "problem.test-fraction": Key("float", 0.2, "mlp: share of rows held out for test accuracy.", lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
    "partition.kind": Key("str", "iid", "iid | dirichlet | label-sorted | pathological.", _one_of("iid", "dirichlet", "label-sorted", "pathological")),
    "partition.alpha": Key("float", 0.5, "dirichlet: concentration alpha.", _positive),
    "partition.classes-per-client": Key("int", 2, "pathological: classes per client.", _at_least(1)),
    "partition.sizes": Key("str", "equal", "Client data sizes: equal, or client i gets a share ~ i+1 (linear), (i+1)^2 (square), e^(i+1) (exponential).", _one_of(*PARTITION_SIZES)),
}

_BUILTIN_PROBLEMS = ("mean-estimation", "logreg", "mlp")
BUILTIN_DATASETS = ("breast_cancer", "digits", "synthetic")  # problem.dataset values that are not files


def _coerce(key: str, spec: Key, value: Any, from_text: bool) -> Any:
    """Convert ``value`` to the key's type, or raise naming key and value."""

    def bad(rule: str) -> ConfigError:
        return ConfigError(f"{key} {rule}, got {value!r}")

    kind = spec.kind
    if kind == "int":
        if from_text:
            try:
                return int(value)
            except ValueError:
                raise bad("must be an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("must be an integer")
        return value
    if kind == "float":
        if from_text:
            try:
                value_f = float(value)
            except ValueError:
                raise bad("must be a number") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("must be a number")
        else:
            value_f = float(value)
        if not math.isfinite(value_f):
            raise bad("must be finite")
        return value_f
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
    if kind == "ints":
        items = str(value).split(",") if (from_text or isinstance(value, str)) else value
        if not isinstance(items, list):
            items = [items]
        try:
            return [int(x) for x in items if str(x).strip()]
        except (TypeError, ValueError):
            raise bad("must be integers") from None
    if kind == "floats":
        items = str(value).split(",") if (from_text or isinstance(value, str)) else value
        if not isinstance(items, list):
            items = [items]
        try:
            out = [float(x) for x in items if str(x).strip()]
        except (TypeError, ValueError):
            raise bad("must be numbers") from None
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
    if name not in _BUILTIN_PROBLEMS and ":" not in name:
        raise ConfigError(
            f"problem.name must be one of {', '.join(_BUILTIN_PROBLEMS)} or 'module:factory', got {name!r}"
        )
    _check_heterogeneity(cfg)
    if base_dir is not None:
        for key, v in data_files(cfg).items():
            p = Path(v).expanduser()
            cfg[key] = str(p if p.is_absolute() else (base_dir / p).resolve())
    return cfg


# Scenario keys that may name a data file, and the values that name built-in data instead.
DATA_FILE_KEYS = ("problem.centers", "problem.dataset")
# SuperNode node-config key: the folder where this node keeps the scenario's data files.
DATA_DIR = "data-dir"


def data_files(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The data files a scenario names: ``{key: path}`` for ``problem.centers`` / ``problem.dataset``."""
    out = {}
    for key in DATA_FILE_KEYS:
        v = cfg.get(key)
        if isinstance(v, str) and v and v not in BUILTIN_DATASETS:
            out[key] = v
    return out


def with_data_dir(cfg: dict[str, Any], data_dir: Any) -> dict[str, Any]:
    """``cfg`` with its data files looked up in a node's ``data-dir``, by file name.

    The rule: a node whose ``data-dir`` is D opens ``D/<file name>`` for every data
    file of the scenario (``problem.centers = "/srv/a/centers.npy"`` ->
    ``D/centers.npy``), and nothing else; a node without ``data-dir`` (None or "")
    opens the path the scenario gives. A file missing from D is a
    :class:`ConfigError` naming the key, the path tried and D.
    """
    if data_dir is None or data_dir == "":
        return cfg
    folder = Path(str(data_dir)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"node config {DATA_DIR} must be an existing folder, got {str(data_dir)!r}")
    out = dict(cfg)
    for key, path in data_files(cfg).items():
        local = folder / Path(path).name
        if not local.is_file():
            raise ConfigError(
                f"{key}: {str(local)!r} not found (the scenario names {path!r}; this node's "
                f"{DATA_DIR} is {str(data_dir)!r} and data files are looked up there by file name)"
            )
        out[key] = str(local)
    return out


def _check_heterogeneity(cfg: dict[str, Any]) -> None:
    """Rules that tie the system-heterogeneity keys to other keys."""
    if cfg["straggler-fraction"] > 0 and cfg["straggler-delay"] == 0:
        raise ConfigError(
            f"straggler-delay must be > 0 when straggler-fraction > 0, got {cfg['straggler-delay']!r} "
            f"(straggler-fraction={cfg['straggler-fraction']!r})"
        )
    if "flower-dp-fixed" in cfg["algorithms"]:
        for key, neutral in (("availability", 1.0), ("straggler-fraction", 0.0)):
            if cfg[key] != neutral:
                raise ConfigError(
                    f"{key}={cfg[key]!r} is not supported by flower-dp-fixed (Flower's own sampling); "
                    f"set {key}={neutral:g} or drop flower-dp-fixed from algorithms"
                )
    sizes = cfg["partition.sizes"]
    if sizes != "equal":
        if cfg["partition.kind"] == "pathological":
            raise ConfigError(
                f"partition.sizes={sizes!r} works with partition.kind iid, dirichlet or label-sorted, "
                "got 'pathological'"
            )
        if cfg["problem.name"] == "mean-estimation":
            raise ConfigError(
                f"partition.sizes={sizes!r} needs a problem with data rows (logreg, mlp), "
                "got problem.name 'mean-estimation' (one centre per client)"
            )


def with_epsilon(cfg: dict[str, Any], target: float) -> dict[str, Any]:
    """``cfg`` with ``sigma`` calibrated so that every client's epsilon after all rounds is ``target``."""
    from fl_clip21.privacy import calibrate_noise_multiplier

    z = calibrate_noise_multiplier(target, cfg["rounds"], cfg["delta"])
    return {**cfg, "target-epsilon": [target], "sigma": 2 * cfg["tau"] * z}


def expand_runs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One resolved config per (target epsilon, seed) of the scenario's grid."""
    seeds = cfg["seeds"] or [cfg["seed"]]
    epsilons = cfg["target-epsilon"] or [None]
    runs = []
    for eps in epsilons:
        base = with_epsilon(cfg, eps) if eps is not None else cfg
        runs.extend({**base, "seed": s} for s in seeds)
    return runs


def load_scenario(path: str | Path, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read a scenario TOML file and resolve it (see :func:`resolve`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"scenario file not found: {str(p)!r}")
    try:
        data = tomllib.loads(p.read_text())
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


def keys_help() -> str:
    """One line per key, for ``fl-clip21 run --help``."""
    lines = []
    for k, spec in SCHEMA.items():
        default = ",".join(spec.default) if isinstance(spec.default, list) else spec.default
        lines.append(f"  {k:<30} {spec.help} [default: {default}]")
    return "\n".join(lines)
