"""Outputs of a run: metrics.json, config.json, convergence.png."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any


def rounds_to_target(records: list[dict[str, Any]], target: float) -> int | None:
    """First round whose grad_norm_sq is <= target (None: never)."""
    for rec in records:
        if rec["grad_norm_sq"] <= target:
            return int(rec["round"])
    return None


def plot_convergence(results: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """grad_norm_sq vs round, log scale, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, records in results.items():
        rounds = [r["round"] for r in records]
        values = [max(r["grad_norm_sq"], 1e-300) for r in records]
        ax.plot(rounds, values, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(r"$\|\nabla f(x)\|^2$")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_outputs(out: Path, cfg: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """Write every output into a temporary folder, then move it to ``out``.

    A run that fails leaves no partial output; an existing ``out`` is replaced
    only once everything was written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fl-clip21-", dir=out.parent))
    try:
        per_algo = {name: res["records"] for name, res in results.items()}
        metrics = {
            "scenario": cfg["name"],
            "algorithms": {
                name: [{k: _jsonable(v) for k, v in rec.items()} for rec in recs]
                for name, recs in per_algo.items()
            },
            "wall_seconds": {name: res["wall_seconds"] for name, res in results.items()},
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
        plot_convergence(per_algo, tmp / "convergence.png", cfg["name"])
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
