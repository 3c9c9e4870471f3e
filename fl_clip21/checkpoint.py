"""Atomic checkpoints of a run's server side: arrays in .npz, the rest as JSON.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over the old one: a crash leaves either the old or the new
checkpoint, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fl_clip21.core import Params

META = "__meta__.json"


def _flatten(groups: dict[str, Params]) -> dict[str, np.ndarray]:
    return {f"{g}/{k}": v for g, params in groups.items() for k, v in params.items()}


def _unflatten(arrays: dict[str, np.ndarray]) -> dict[str, Params]:
    groups: dict[str, Params] = {}
    for name, v in arrays.items():
        g, _, k = name.partition("/")
        groups.setdefault(g, {})[k] = v
    return groups


def save(path: Path, arrays: dict[str, Params], meta: dict[str, Any]) -> None:
    """Write groups of arrays and JSON metadata to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **_flatten(arrays), **{META: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> tuple[dict[str, Params], dict[str, Any]]:
    """Read what :func:`save` wrote: ``(array groups, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != META}
        meta = json.loads(bytes(data[META]).decode())
    return _unflatten(arrays), meta
